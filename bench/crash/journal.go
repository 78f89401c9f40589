package crash

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
)

// Journal events: what a Record reports.
const (
	// EventStart is written when a handler begins, before anything else.
	EventStart = "start"
	// EventCheckpoint is written when a checkpoint was acknowledged.
	EventCheckpoint = "checkpoint"
	// EventEnd is written when a handler is about to return its result,
	// before the FINISH goes out.
	EventEnd = "end"
	// EventLive is written for each live message the run received (its
	// Text), EventDecision for each decision (its CallID), and
	// EventCancel when the run's context was cancelled (Text: the cause);
	// AtNs is when. All are written before the run's end record.
	EventLive     = "live"
	EventDecision = "decision"
	EventCancel   = "cancel"
)

// Outcomes of an EventEnd record.
const (
	OutcomeDone      = "done"      // completed: Done
	OutcomeResumed   = "resumed"   // a suspended tool call got its decision: Done
	OutcomeSuspended = "suspended" // returned Suspended: the run waits
	OutcomeCancelled = "cancelled" // the sidecar cancelled the run
	OutcomeTransient = "transient" // returned Transient
	OutcomePermanent = "permanent" // returned Permanent
	OutcomeLost      = "lost"      // the connection was lost: no FINISH reaches the sidecar
	OutcomeShutdown  = "shutdown"  // the agent shut down under the run
)

// Record is one line of an agent's journal. A start record carries the
// run's identity and StartNs; an end record repeats it with EndNs and
// Outcome; a checkpoint record names the session, the checkpoint's Index
// (1-based, the i of "m<i>") and when its acknowledgement arrived; a live,
// decision or cancel record names the session and what it received. Times
// are Unix nanoseconds of the wall clock, comparable with the harness's.
type Record struct {
	Event      string `json:"ev"`
	ThreadID   string `json:"thread_id"`
	RunID      string `json:"run_id"`
	DispatchID string `json:"dispatch_id"`
	Attempt    int    `json:"attempt"`
	SessionID  string `json:"session_id"`
	StartNs    int64  `json:"start_ns"`
	EndNs      int64  `json:"end_ns,omitempty"`
	Outcome    string `json:"outcome,omitempty"`
	Command    string `json:"command,omitempty"` // start: the command the run executes
	Index      int    `json:"index,omitempty"`   // checkpoint: i of m<i>
	AckNs      int64  `json:"ack_ns,omitempty"`  // checkpoint: when the ack arrived
	Text       string `json:"text,omitempty"`    // live: the message text; cancel: the cause
	CallID     string `json:"call_id,omitempty"` // decision: its tool call
	AtNs       int64  `json:"at_ns,omitempty"`   // live, decision, cancel: when it was received
	PID        int    `json:"pid"`
}

// Journal appends Records to a file, one JSON line each, written with a
// single write(2) on a file opened O_APPEND and fsynced before Append
// returns: a line that Append returned for is in the file whatever
// happens to the process afterwards.
type Journal struct {
	mu sync.Mutex // serialises appends
	f  *os.File
}

// OpenJournal opens (creating) the journal at path for appending.
func OpenJournal(path string) (*Journal, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open journal: %w", err)
	}
	return &Journal{f: f}, nil
}

// Append writes r as one line and fsyncs it.
func (j *Journal) Append(r Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("journal: encode: %w", err)
	}
	b = append(b, '\n')
	j.mu.Lock()
	defer j.mu.Unlock()
	if _, err := j.f.Write(b); err != nil {
		return fmt.Errorf("journal: write: %w", err)
	}
	if err := j.f.Sync(); err != nil {
		return fmt.Errorf("journal: fsync: %w", err)
	}
	return nil
}

// Close closes the journal file.
func (j *Journal) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.f.Close()
}

// ReadJournal reads every complete record of the journal at path. A last
// line without its newline (a write cut short) is ignored; any other line
// that does not decode is an error.
func ReadJournal(path string) ([]Record, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Record
	for n := 1; len(data) > 0; n++ {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break // torn last line
		}
		line := data[:i]
		data = data[i+1:]
		var r Record
		if err := json.Unmarshal(line, &r); err != nil {
			return out, fmt.Errorf("journal %s line %d: %w", path, n, err)
		}
		out = append(out, r)
	}
	return out, nil
}
