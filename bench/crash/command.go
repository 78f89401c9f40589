package crash

import (
	"fmt"
	"strconv"
	"strings"
)

// Verbs of a Command: what the chaos agent does with a run.
const (
	// VerbSleep sleeps Arg ms, cancellable, echoing live messages.
	VerbSleep = "sleep"
	// VerbCheckpoint checkpoints Arg messages m1…m<Arg> one by one, each
	// waiting for its ack, sleeping Arg2 ms after each.
	VerbCheckpoint = "cp"
	// VerbSuspend suspends tool call SuspendCallID and waits up to Arg ms
	// for its decision: Done when it comes, Suspended otherwise.
	VerbSuspend = "suspend"
	// VerbTransient fails transiently while the attempt is at most Arg,
	// then completes.
	VerbTransient = "transient"
	// VerbPermanent fails permanently.
	VerbPermanent = "permanent"
	// VerbDone completes at once.
	VerbDone = "done"
	// VerbLive marks a live message; a run it activates completes at once.
	VerbLive = "live"
)

// SuspendCallID is the tool call a suspended run waits on.
const SuspendCallID = "call-1"

// Command is the text of an activation message: a nonce that makes the
// message unique (and findable in the thread log), a verb and up to two
// integer arguments, e.g. "n-sidecar-17 cp 3 20".
type Command struct {
	Nonce string
	Verb  string
	Arg   int
	Arg2  int
}

// String is the message text of c.
func (c Command) String() string {
	switch c.Verb {
	case VerbCheckpoint:
		return fmt.Sprintf("%s %s %d %d", c.Nonce, c.Verb, c.Arg, c.Arg2)
	case VerbSleep, VerbSuspend, VerbTransient:
		return fmt.Sprintf("%s %s %d", c.Nonce, c.Verb, c.Arg)
	}
	return c.Nonce + " " + c.Verb
}

// ParseCommand parses a message text made by Command.String.
func ParseCommand(text string) (Command, bool) {
	f := strings.Fields(text)
	if len(f) < 2 || !strings.HasPrefix(f[0], "n-") {
		return Command{}, false
	}
	c := Command{Nonce: f[0], Verb: f[1]}
	want := 0
	switch c.Verb {
	case VerbCheckpoint:
		want = 2
	case VerbSleep, VerbSuspend, VerbTransient:
		want = 1
	case VerbPermanent, VerbDone, VerbLive:
	default:
		return Command{}, false
	}
	if len(f) != 2+want {
		return Command{}, false
	}
	args := []*int{&c.Arg, &c.Arg2}
	for i := 0; i < want; i++ {
		n, err := strconv.Atoi(f[2+i])
		if err != nil || n < 0 {
			return Command{}, false
		}
		*args[i] = n
	}
	return c, true
}

// CheckpointText is the text of checkpointed message index of total in
// one attempt: "m<index> of <total> d=<dispatch> s=<session> a=<attempt>".
// It names its attempt, so a re-executed run's checkpoints are told apart
// from the first attempt's.
func CheckpointText(index, total int, dispatchID, sessionID string, attempt int) string {
	return fmt.Sprintf("m%d of %d d=%s s=%s a=%d", index, total, dispatchID, sessionID, attempt)
}

// CheckpointMark is a parsed CheckpointText.
type CheckpointMark struct {
	Index, Total int
	DispatchID   string
	SessionID    string
	Attempt      int
}

// ParseCheckpointText parses a text made by CheckpointText.
func ParseCheckpointText(text string) (CheckpointMark, bool) {
	f := strings.Fields(text)
	if len(f) != 6 || !strings.HasPrefix(f[0], "m") || f[1] != "of" {
		return CheckpointMark{}, false
	}
	var m CheckpointMark
	var err error
	if m.Index, err = strconv.Atoi(f[0][1:]); err != nil {
		return CheckpointMark{}, false
	}
	if m.Total, err = strconv.Atoi(f[2]); err != nil {
		return CheckpointMark{}, false
	}
	var ok1, ok2, ok3 bool
	var att string
	m.DispatchID, ok1 = strings.CutPrefix(f[3], "d=")
	m.SessionID, ok2 = strings.CutPrefix(f[4], "s=")
	att, ok3 = strings.CutPrefix(f[5], "a=")
	if !ok1 || !ok2 || !ok3 {
		return CheckpointMark{}, false
	}
	if m.Attempt, err = strconv.Atoi(att); err != nil {
		return CheckpointMark{}, false
	}
	return m, true
}
