package badgerstore

import (
	"encoding/binary"
	"fmt"
	"math"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Key layout. One Badger database holds everything; the first byte of a
// key names its family. "seg" is a 2-byte big-endian length followed by the
// bytes (so one thread's prefix can never be a prefix of another's); "ts"
// is an int64 with the sign bit flipped, big-endian (so it sorts as a
// number); "id" at the end of a key is the raw id bytes.
//
// Records:
//
//	d<dispatch_id>                              dispatch (binary.go)
//	e<thread_id>                                thread state: epoch, queued count,
//	                                            claimed dispatch, queue floor
//	                                            (threadstate.go)
//	R<run_id>                                   run record (binary.go)
//	H<thread_id>                                thread projection (binary.go)
//	M<seg thread><seq u64>                      message record (binary; JSON before format 3)
//
// Dispatch indexes (derived from the record; Verify recomputes them):
//
//	a<seg thread><prio u8><created ts><id>  →  ()             every dispatch of a thread (written once;
//	                                                          earlier versions stored the status)
//	q<seg thread><prio u8><created ts><id>  →  available ts   queued, claim order
//	v<seg thread><available ts><id>         →  ()             queued, the thread's due order
//	c<thread_id>                            →  dispatch id    the thread's one claimed dispatch
//	l<lease ts><id>                         →  ()             claimed, lease expiry order
//	k<seg thread><dedupe key>               →  dispatch id    non-terminal dedupe holder
//	t<updated ts><created ts><id>           →  ()             terminal, reconcile/purge order
//	x<completed ts><id>                     →  ()             dead letters
//
// Counters and markers (maintained by deltas; Verify recomputes them):
//
//	n<status u8>                                number of dispatches in that status
//	h<thread_id>                                present while the thread has queued dispatches
//	r<due ts><thread_id>                        one per claimable thread (queued work, no
//	                                            claimed dispatch), by its earliest due time
//
// Run and message indexes:
//
//	T<seg thread><updated ts><created ts><run_id>  latest run of a thread
//	W<created ts><run_id>                           waiting runs (the only status
//	                                                listed by status on a hot path:
//	                                                recovery's wake of background-task
//	                                                runs); other statuses are filtered
//	                                                from A or U
//	S<status><0><created ts><run_id>                retired (runs by every status, up to
//	                                                the seventh session): dropped at Open
//	A<created ts><run_id>                           all runs
//	U<seg thread><created ts><run_id>               runs of a thread
//	I<seg thread><message_id>  →  seq u64           message by id
//	N<thread_id>               →  count u64         message count (append guard)
//
// Options the data directory keeps:
//
//	ovt                        →  u64               the smallest ValueThreshold it was opened with
//	ofv                        →  u64               its DataFormat (Open refuses a later one)
//	ogc                        →  u64               when the last value-log GC ended (Unix ns): its
//	                                                synced marker (collectValueLog, repair.go)
const (
	pDispatch   = 'd'
	pEpoch      = 'e'
	pRun        = 'R'
	pThread     = 'H'
	pMessage    = 'M'
	pAll        = 'a'
	pQueue      = 'q'
	pReady      = 'r'
	pAvail      = 'v'
	pLease      = 'l'
	pDedupe     = 'k'
	pTerminal   = 't'
	pDead       = 'x'
	pCount      = 'n'
	pThreadQ    = 'h'
	pRunLatest  = 'T'
	pRunStatus  = 'S' // retired: see migrateRunStatusIndex
	pRunWaiting = 'W'
	pOption     = 'o' // o<name>: a store option the data directory keeps (checkValueThreshold)
	pRunAll     = 'A'
	pRunThread  = 'U'
	pMessageID  = 'I'
	pMsgCount   = 'N'
	tsBytes     = 8
	maxSegBytes = math.MaxUint16
)

func appendTS(b []byte, ts int64) []byte {
	return binary.BigEndian.AppendUint64(b, uint64(ts)^(1<<63))
}

func readTS(b []byte) int64 { return int64(binary.BigEndian.Uint64(b) ^ (1 << 63)) }

func appendSeg(b []byte, s string) []byte {
	b = binary.BigEndian.AppendUint16(b, uint16(len(s)))
	return append(b, s...)
}

func key1(p byte, id string) []byte {
	b := make([]byte, 0, 1+len(id))
	return append(append(b, p), id...)
}

func dispatchKey(id string) []byte { return key1(pDispatch, id) }
func stateKey(t string) []byte     { return key1(pEpoch, t) }
func runKey(id string) []byte      { return key1(pRun, id) }
func threadKey(t string) []byte    { return key1(pThread, t) }
func threadQKey(t string) []byte   { return key1(pThreadQ, t) }
func msgCountKey(t string) []byte  { return key1(pMsgCount, t) }
func countKey(s engine.DispatchStatus) []byte {
	return []byte{pCount, byte(s)}
}

// threadPrefix is p<seg thread>.
func threadPrefix(p byte, t string) []byte {
	b := make([]byte, 0, 3+len(t)+tsBytes*2+32)
	return appendSeg(append(b, p), t)
}

func orderKey(p byte, d *engine.Dispatch) []byte {
	b := threadPrefix(p, d.ThreadID)
	b = append(b, d.Priority)
	b = appendTS(b, d.CreatedAt)
	return append(b, d.DispatchID...)
}

// orderKeyID returns the dispatch id at the end of an a/q key of thread t.
func orderKeyID(k []byte, t string) string { return string(k[1+2+len(t)+1+tsBytes:]) }

// availKey is v<seg thread><available ts><id>.
func availKey(d *engine.Dispatch) []byte {
	b := appendTS(threadPrefix(pAvail, d.ThreadID), d.AvailableAt)
	return append(b, d.DispatchID...)
}

// readyKey is r<due ts><thread>.
func readyKey(thread string, due int64) []byte {
	b := make([]byte, 0, 1+tsBytes+len(thread))
	b = appendTS(append(b, pReady), due)
	return append(b, thread...)
}

func leaseKey(d *engine.Dispatch) []byte {
	b := make([]byte, 0, 1+tsBytes+len(d.DispatchID))
	b = appendTS(append(b, pLease), d.LeaseUntil)
	return append(b, d.DispatchID...)
}

func dedupeKey(d *engine.Dispatch) []byte {
	return append(threadPrefix(pDedupe, d.ThreadID), d.DedupeKey...)
}

func dedupeKeyFor(thread, key string) []byte {
	return append(threadPrefix(pDedupe, thread), key...)
}

func terminalKey(d *engine.Dispatch) []byte {
	b := make([]byte, 0, 1+2*tsBytes+len(d.DispatchID))
	b = appendTS(append(b, pTerminal), d.UpdatedAt)
	b = appendTS(b, d.CreatedAt)
	return append(b, d.DispatchID...)
}

func terminalCursorKey(c engine.TerminalCursor) []byte {
	b := make([]byte, 0, 1+2*tsBytes+len(c.DispatchID))
	b = appendTS(append(b, pTerminal), c.UpdatedAt)
	b = appendTS(b, c.CreatedAt)
	return append(b, c.DispatchID...)
}

func deadKey(d *engine.Dispatch) []byte {
	b := make([]byte, 0, 1+tsBytes+len(d.DispatchID))
	b = appendTS(append(b, pDead), d.CompletedAt)
	return append(b, d.DispatchID...)
}

func messageKey(t string, seq uint64) []byte {
	return binary.BigEndian.AppendUint64(threadPrefix(pMessage, t), seq)
}

// splitMessageKey parses M<seg thread><seq>.
func splitMessageKey(k []byte) (thread string, seq uint64, ok bool) {
	if len(k) < 3 {
		return "", 0, false
	}
	n := int(binary.BigEndian.Uint16(k[1:3]))
	if len(k) != 3+n+8 {
		return "", 0, false
	}
	return string(k[3 : 3+n]), binary.BigEndian.Uint64(k[3+n:]), true
}

func messageIDKey(t, id string) []byte { return append(threadPrefix(pMessageID, t), id...) }

func runLatestKey(r *engine.RunRecord) []byte {
	b := threadPrefix(pRunLatest, r.ThreadID)
	b = appendTS(b, r.UpdatedAt)
	b = appendTS(b, r.CreatedAt)
	return append(b, r.RunID...)
}

// runStatusPrefix is the prefix of the retired index of runs by status.
func runStatusPrefix(s engine.RunStatus) []byte {
	b := make([]byte, 0, 2+len(s)+tsBytes+40)
	return append(append(append(b, pRunStatus), s...), 0)
}

func runWaitingKey(createdAt int64, runID string) []byte {
	b := make([]byte, 0, 1+tsBytes+len(runID))
	return append(appendTS(append(b, pRunWaiting), createdAt), runID...)
}

func runAllKey(r *engine.RunRecord) []byte {
	b := make([]byte, 0, 1+tsBytes+len(r.RunID))
	return append(appendTS(append(b, pRunAll), r.CreatedAt), r.RunID...)
}

func runThreadKey(r *engine.RunRecord) []byte {
	return append(appendTS(threadPrefix(pRunThread, r.ThreadID), r.CreatedAt), r.RunID...)
}

func u64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

// counter decodes an 8-byte counter; an absent key (nil) is 0, any other
// length is corrupt.
func counter(key, b []byte) (uint64, error) {
	if b == nil {
		return 0, nil
	}
	if len(b) != 8 {
		return 0, fmt.Errorf("counter %q is %d bytes: %w", key, len(b), engine.ErrCorrupt)
	}
	return binary.BigEndian.Uint64(b), nil
}

func readU64(b []byte) uint64 {
	if len(b) != 8 {
		return 0
	}
	return binary.BigEndian.Uint64(b)
}

// prefixEnd returns the smallest key greater than every key with prefix p.
func prefixEnd(p []byte) []byte {
	end := append([]byte(nil), p...)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return nil
}
