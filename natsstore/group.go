package natsstore

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Group commit. On a single-replica file stream the server stages every
// atomic batch in a file store of its own, created and removed for that
// batch, and one stream takes one batch at a time: a batch costs a few
// milliseconds however small it is. So concurrent transactions of this
// process are merged: each hands its messages to the group committer,
// which publishes everything waiting as one atomic batch (up to
// maxGroupMsgs messages) and answers each transaction with the sequences
// of its own messages. Transactions on one thread never meet in a group
// (the thread lock is held until the commit returns), so merged
// transactions rarely touch the same subject; when a merged batch is
// refused anyway (a conflict, a busy server, a batch too large), every
// member publishes its own batch again, and a
// member whose own batch is refused retries from its reads as usual.

// maxGroupMsgs bounds one merged batch (the server's default limit is
// 1000 messages per atomic batch).
const maxGroupMsgs = 900

// maxGroupRunners bounds the merged batches in flight at once. One: the
// server takes one atomic batch per stream at a time, so a second batch
// in flight from this process would only wait at the server, while
// waiting here it merges with what arrives meanwhile (A/B runs, 2 → 1:
// the 64-thread dispatch cycle from ~500–700 to ~870 cycles/s, one
// sidecar's background runs on fresh threads from ~450 to ~710 runs/s).
const maxGroupRunners = 1

// errAlone tells a member of a refused merged batch to publish alone.
var errAlone = errors.New("merged batch refused")

type pendingBatch struct {
	msgs []outMsg
	done chan groupResult // buffered: the runner never blocks on it
}

type groupResult struct {
	last uint64 // sequence of this member's last message
	err  error
}

type committer struct {
	mu      sync.Mutex // guards queue, running and closed
	queue   []*pendingBatch
	running int
	closed  bool           // set by Close before it waits for the runners
	wg      sync.WaitGroup // runners; Add only under mu while !closed
}

// close refuses new work and waits for the runners to finish.
func (c *committer) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.wg.Wait()
}

// commit publishes one transaction's messages: one message alone, several
// as part of a merged atomic batch.
func (s *Store) commit(ctx context.Context, msgs []outMsg) (uint64, error) {
	if len(msgs) == 1 || len(msgs) > maxGroupMsgs {
		return s.publish(ctx, msgs)
	}
	p := &pendingBatch{msgs: msgs, done: make(chan groupResult, 1)}
	c := &s.group
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, fmt.Errorf("store closed: %w", engine.ErrUnavailable)
	}
	c.queue = append(c.queue, p)
	start := c.running < maxGroupRunners
	if start {
		c.running++
		c.wg.Add(1)
	}
	c.mu.Unlock()
	if start {
		go s.runGroups()
	}
	select {
	case r := <-p.done:
		if errors.Is(r.err, errAlone) {
			return s.publish(ctx, msgs)
		}
		return r.last, r.err
	case <-ctx.Done():
		return 0, fmt.Errorf("commit outcome unknown: %w", unavailable(ctx.Err()))
	}
}

// runGroups publishes merged batches until the queue is empty.
func (s *Store) runGroups() {
	c := &s.group
	defer c.wg.Done()
	for {
		c.mu.Lock()
		if len(c.queue) == 0 {
			c.running--
			c.mu.Unlock()
			return
		}
		n, total := 0, 0
		for n < len(c.queue) && (n == 0 || total+len(c.queue[n].msgs) <= maxGroupMsgs) {
			total += len(c.queue[n].msgs)
			n++
		}
		group := make([]*pendingBatch, n)
		copy(group, c.queue[:n])
		c.queue = c.queue[n:]
		c.mu.Unlock()
		s.publishGroup(group, total)
	}
}

// publishGroup publishes the members' messages as one batch and answers
// each member.
func (s *Store) publishGroup(group []*pendingBatch, total int) {
	if len(group) == 1 {
		last, err := s.publish(context.Background(), group[0].msgs)
		group[0].done <- groupResult{last: last, err: err}
		return
	}
	msgs := make([]outMsg, 0, total)
	for _, p := range group {
		msgs = append(msgs, p.msgs...)
	}
	last, err := s.publish(context.Background(), msgs)
	if errors.Is(err, errConflict) || errors.Is(err, errBusy) || errors.Is(err, engine.ErrTooLarge) {
		// One member's refusal is not the others': each publishes its
		// own batch (a member too large alone fails alone).
		err = errAlone
	}
	end := 0
	for _, p := range group {
		end += len(p.msgs)
		r := groupResult{err: err}
		if err == nil {
			r.last = last - uint64(total-end)
		}
		p.done <- r
	}
}
