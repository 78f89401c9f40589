package natsstore

import (
	"encoding/hex"
	"fmt"
	"strings"
)

// Subject layout. Every record is the single message (history 1) of its
// own subject in one stream; "seg(x)" is "h" followed by the lowercase hex
// of x's UTF-8 bytes, so ids never change the subject's structure (no '.',
// '*', '>' or spaces can leak in) and the mapping is reversible.
//
//	<p>.d.<seg dispatch>             dispatch JSON
//	<p>.e.<seg thread>               thread state: epoch and the claimed dispatch (the claim guard)
//	<p>.k.<seg thread>.<seg key>     dedupe lock: the id of the non-terminal dispatch holding the key
//	<p>.r.<seg run>                  run record JSON
//	<p>.t.<seg thread>               thread projection JSON (with the message count)
//	<p>.m.<seg thread>.<seq>         message record JSON; seq is 20 decimal digits
//	<p>.mi.<seg thread>.<seg msg>    message id lock: the message's seq
//	<p>.x                            check messages (see txn.go); never read
//
// A deleted record is a tombstone: an empty message with header Mbx-Op: DEL.
const (
	famDispatch  = "d"
	famState     = "e"
	famDedupe    = "k"
	famRun       = "r"
	famThread    = "t"
	famMessage   = "m"
	famMessageID = "mi"
	famCheck     = "x"
)

// seg encodes one id as a subject token.
func seg(s string) string {
	b := make([]byte, 1+2*len(s))
	b[0] = 'h'
	hex.Encode(b[1:], []byte(s))
	return string(b)
}

// unseg decodes a token made by seg.
func unseg(tok string) (string, error) {
	if len(tok) == 0 || tok[0] != 'h' {
		return "", fmt.Errorf("subject token %q is not a segment", tok)
	}
	b, err := hex.DecodeString(tok[1:])
	if err != nil {
		return "", fmt.Errorf("subject token %q: %w", tok, err)
	}
	return string(b), nil
}

// subjects builds the subjects of one store.
type subjects struct {
	p string // prefix + "."
}

func (s subjects) dispatch(id string) string  { return s.p + famDispatch + "." + seg(id) }
func (s subjects) state(thread string) string { return s.p + famState + "." + seg(thread) }
func (s subjects) dedupe(thread, key string) string {
	return s.p + famDedupe + "." + seg(thread) + "." + seg(key)
}
func (s subjects) run(id string) string        { return s.p + famRun + "." + seg(id) }
func (s subjects) thread(thread string) string { return s.p + famThread + "." + seg(thread) }
func (s subjects) message(thread string, seq uint64) string {
	return fmt.Sprintf("%s%s.%s.%020d", s.p, famMessage, seg(thread), seq)
}
func (s subjects) messageID(thread, id string) string {
	return s.p + famMessageID + "." + seg(thread) + "." + seg(id)
}
func (s subjects) check() string { return s.p + famCheck }

// family returns the family token of a subject of this store and the rest
// after it ("" when the subject is not one of ours).
func (s subjects) family(subj string) (fam, rest string) {
	if !strings.HasPrefix(subj, s.p) {
		return "", ""
	}
	fam, rest, _ = strings.Cut(subj[len(s.p):], ".")
	return fam, rest
}
