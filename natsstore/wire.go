package natsstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The wire: point reads are JetStream direct gets (last message of a
// subject), writes are one publish or one atomic batch publish whose every
// message carries the stream sequence its subject must still have.

// Header names of the JetStream protocol and of this package.
const (
	hdrOp             = "Mbx-Op" // "DEL" marks a tombstone
	opDelete          = "DEL"
	hdrExpSubjSeq     = "Nats-Expected-Last-Subject-Sequence"
	hdrExpSubjSeqSubj = "Nats-Expected-Last-Subject-Sequence-Subject"
	hdrBatchID        = "Nats-Batch-Id"
	hdrBatchSeq       = "Nats-Batch-Sequence"
	hdrBatchCommit    = "Nats-Batch-Commit"
	hdrSequence       = "Nats-Sequence"
	hdrSubject        = "Nats-Subject"
	hdrNumPending     = "Nats-Num-Pending"
	hdrStatus         = "Status"
	hdrDescription    = "Description"
)

// JetStream API error codes this package tells apart.
const (
	errCodeWrongLastSeq         = 10071
	errCodeWrongLastSeqConstant = 10164
	errCodeBatchIncomplete      = 10176
	errCodeBatchTooLarge        = 10199
	errCodeBatchTooManyInflight = 10210
	errCodeMsgTooLarge          = 10054
)

// errConflict reports a batch refused because a subject it expected moved
// on (another writer won); the operation re-reads and retries.
var errConflict = errors.New("record changed concurrently")

// errBusy reports a batch the server could not take now (too many open
// batches, or a batch it dropped); retried like a conflict.
var errBusy = errors.New("server busy with other batches")

// rec is one record as read: the stream sequence of its subject's last
// message (0 when the subject never had one) and its body (nil when the
// subject is missing or its last message is a tombstone).
type rec struct {
	seq  uint64
	data []byte
}

// outMsg is one message of a write: a record (data), a tombstone (del) or
// a check of another subject (checkSubj, written to the check subject).
type outMsg struct {
	subj      string
	data      []byte
	del       bool
	expect    uint64
	checkSubj string
	indexed   bool // the index consumer sees this subject
}

// reqCtx bounds ctx by the request timeout when it has no deadline.
func (s *Store) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, s.cfg.RequestTimeout)
}

// getLast reads the last message of subj. A single-replica stream
// answers direct gets from its one replica. On a replicated stream any
// replica answers a direct get, and a follower may not yet hold what was
// committed (this store's own writes included), so the read goes to the
// stream leader through the message-get API instead: every point read
// then sees every acknowledged write (with direct gets, reads through a
// follower missed a write just acknowledged now and then under load:
// TestClusterReadsSeeAcknowledgedWrites).
func (s *Store) getLast(ctx context.Context, subj string) (rec, error) {
	if err := s.usable(); err != nil {
		return rec{}, err
	}
	ctx, cancel := s.reqCtx(ctx)
	defer cancel()
	if s.cfg.Replicas > 1 {
		req, err := json.Marshal(msgGetRequest{LastFor: subj})
		if err != nil {
			return rec{}, fmt.Errorf("read %s: %w", subj, err)
		}
		m, err := s.nc.RequestWithContext(ctx, s.msgGet, req)
		if err != nil {
			return rec{}, fmt.Errorf("read %s: %w", subj, unavailable(err))
		}
		return parseMsgGet(subj, m)
	}
	m, err := s.nc.RequestWithContext(ctx, s.directGet+subj, nil)
	if err != nil {
		return rec{}, fmt.Errorf("read %s: %w", subj, unavailable(err))
	}
	return parseDirect(subj, m)
}

// getMany reads the last message of each of subjs: on a single-replica
// stream in batched direct gets (getBatch), on a replicated one
// readFanout point reads at a time (a listing's records, read one after
// another, cost a round trip each: found by measuring a restart, whose
// reconciliation of 10 000 finished dispatches waited on 10 000 reads in
// a row). out[i] is subjs[i]'s record; the first error fails the whole.
func (s *Store) getMany(ctx context.Context, subjs []string) ([]rec, error) {
	out := make([]rec, len(subjs))
	if s.cfg.Replicas <= 1 && len(subjs) > 1 {
		// Batches of at most maxMultiGet subjects whose request fits in
		// half the server's max_payload.
		budget := int(s.nc.MaxPayload())/2 - 64
		for i := 0; i < len(subjs); {
			j, size := i, 0
			for j < len(subjs) && j-i < maxMultiGet && (j == i || size+len(subjs[j])+3 <= budget) {
				size += len(subjs[j]) + 3
				j++
			}
			if err := s.getBatch(ctx, subjs[i:j], out[i:j]); err != nil {
				return nil, err
			}
			i = j
		}
		return out, nil
	}
	if len(subjs) <= 1 {
		for i, subj := range subjs {
			r, err := s.getLast(ctx, subj)
			if err != nil {
				return nil, err
			}
			out[i] = r
		}
		return out, nil
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		errOnce  sync.Once
		firstErr error
	)
	for range min(readFanout, len(subjs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(subjs) || ctx.Err() != nil {
					return
				}
				r, err := s.getLast(ctx, subjs[i])
				if err != nil {
					errOnce.Do(func() { firstErr = err; cancel() })
					return
				}
				out[i] = r
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, firstErr
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	return out, nil
}

// readFanout is how many reads getMany keeps in flight on a replicated
// stream.
const readFanout = 16

// maxMultiGet is the most subjects one batched direct get may name (the
// server answers more with 413 Too Many Results).
const maxMultiGet = 1024

// multiGetRequest is the body of a batched direct get: the last message
// of each subject named, up to batch messages.
type multiGetRequest struct {
	MultiLast []string `json:"multi_last"`
	Batch     int      `json:"batch"`
	MaxBytes  int      `json:"max_bytes,omitempty"`
}

// multiGetMaxBytes bounds the bytes of one batched direct get's reply
// (the server stops after the record that reaches it; getBatch asks again
// for the rest). Without it the server fills a reply up to its
// max_pending, 64 MiB, the same bound at which it drops a client that
// falls behind (found by review). Tests set it to 1.
var multiGetMaxBytes = 4 << 20

// getBatch reads the last message of each of subjs (literal, at most
// maxMultiGet) into out with one batched direct get: one request, the
// found records streamed back in sequence order, then an end-of-batch
// status; subjects without a message are left zero. The server reads
// them all at one point of the stream. A batch the server cut short (its
// byte limit) is finished with another; one it failed part way (a record
// it found and could not load: "404 Message Not Found") is finished with
// point reads, which tell a missing record from a failed read.
func (s *Store) getBatch(ctx context.Context, subjs []string, out []rec) error {
	if err := s.usable(); err != nil {
		return err
	}
	parent := ctx
	ctx, cancel := s.reqCtx(ctx)
	defer cancel()
	req, err := json.Marshal(multiGetRequest{MultiLast: subjs, Batch: len(subjs), MaxBytes: multiGetMaxBytes})
	if err != nil {
		return fmt.Errorf("read %d records: %w", len(subjs), err)
	}
	at := make(map[string]int, len(subjs))
	for i, subj := range subjs {
		if _, dup := at[subj]; !dup {
			at[subj] = i
		}
	}
	seen := make([]bool, len(subjs))
	// finish reads what the batch left out (none, again in a batch, or
	// one at a time), then copies each record to the later places of its
	// subject.
	const (
		complete = iota
		batchRest
		pointRest
	)
	finish := func(rest int) error {
		var subjsLeft []string
		var left []int
		for i, subj := range subjs {
			if rest != complete && at[subj] == i && !seen[i] {
				subjsLeft, left = append(subjsLeft, subj), append(left, i)
			}
		}
		if len(left) > 0 {
			more := make([]rec, len(left))
			if rest == batchRest {
				// Each its own request timeout, as the first.
				if err := s.getBatch(parent, subjsLeft, more); err != nil {
					return err
				}
			} else {
				for k, subj := range subjsLeft {
					r, err := s.getLast(parent, subj)
					if err != nil {
						return err
					}
					more[k] = r
				}
			}
			for k, i := range left {
				out[i] = more[k]
			}
		}
		for i, subj := range subjs {
			if first := at[subj]; first != i {
				out[i] = out[first]
			}
		}
		return nil
	}
	// A channel sized for every reply (a record per distinct subject, then
	// one status): the client's default for a subscription, 512 Ki
	// messages, was most of the cost of a batch (found by profiling).
	replies := make(chan *nats.Msg, len(subjs)+1)
	inbox := s.nc.NewInbox()
	sub, err := s.nc.ChanSubscribe(inbox, replies)
	if err != nil {
		return fmt.Errorf("read %d records: %w", len(subjs), unavailable(err))
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := s.nc.PublishRequest(s.directGet[:len(s.directGet)-1], inbox, req); err != nil {
		return fmt.Errorf("read %d records: %w", len(subjs), unavailable(err))
	}
	for got := 0; ; {
		var m *nats.Msg
		select {
		case m = <-replies:
		case <-ctx.Done():
			return fmt.Errorf("read %d records (%d in): %w", len(subjs), got, unavailable(ctx.Err()))
		case <-s.done:
			return fmt.Errorf("read %d records: store closed: %w", len(subjs), engine.ErrUnavailable)
		}
		if len(m.Data) == 0 {
			switch st := m.Header.Get(hdrStatus); st {
			case "204": // end of batch; records left when it was cut
				if n := m.Header.Get(hdrNumPending); n == "" || n == "0" {
					return finish(complete)
				}
				if got == 0 {
					return finish(pointRest) // no progress in a batch
				}
				return finish(batchRest)
			case "404":
				if m.Header.Get(hdrDescription) == "No Results" {
					return finish(complete) // none of them has a message
				}
				return finish(pointRest)
			case "":
			default:
				return fmt.Errorf("read %d records: status %s %s: %w", len(subjs), st, m.Header.Get(hdrDescription), engine.ErrUnavailable)
			}
		}
		subj := m.Header.Get(hdrSubject)
		i, ok := at[subj]
		if !ok {
			return fmt.Errorf("read %d records: a reply for subject %q, not asked for: %w", len(subjs), subj, engine.ErrCorrupt)
		}
		r, err := parseDirect(subj, m)
		if err != nil {
			return err
		}
		out[i] = r
		seen[i] = true
		got++
	}
}

// msgGetRequest is the body of a $JS.API.STREAM.MSG.GET request.
type msgGetRequest struct {
	LastFor string `json:"last_by_subj"`
}

// msgGetReply is its answer.
type msgGetReply struct {
	Error   *apiError `json:"error"`
	Message *struct {
		Seq    uint64 `json:"seq"`
		Header []byte `json:"hdrs"`
		Data   []byte `json:"data"`
	} `json:"message"`
}

// errCodeNoMessageFound is the message-get API's "no message found".
const errCodeNoMessageFound = 10037

// parseMsgGet decodes a message-get API reply.
func parseMsgGet(subj string, m *nats.Msg) (rec, error) {
	if len(m.Data) == 0 {
		return rec{}, fmt.Errorf("read %s: empty reply (status %s): %w", subj, m.Header.Get(hdrStatus), engine.ErrUnavailable)
	}
	var r msgGetReply
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return rec{}, fmt.Errorf("read %s: reply %q: %w", subj, m.Data, engine.ErrUnavailable)
	}
	if r.Error != nil {
		if r.Error.ErrCode == errCodeNoMessageFound {
			return rec{}, nil
		}
		return rec{}, fmt.Errorf("read %s: %w: %w", subj, engine.ErrUnavailable, r.Error)
	}
	if r.Message == nil || r.Message.Seq == 0 {
		return rec{}, fmt.Errorf("read %s: reply without a stream sequence: %w", subj, engine.ErrCorrupt)
	}
	if headerValue(r.Message.Header, hdrOp) == opDelete || len(r.Message.Data) == 0 {
		return rec{seq: r.Message.Seq}, nil
	}
	return rec{seq: r.Message.Seq, data: r.Message.Data}, nil
}

// headerValue returns the value of key in a raw NATS header block
// ("NATS/1.0\r\nKey: value\r\n…"), "" when absent.
func headerValue(block []byte, key string) string {
	lines := strings.Split(string(block), "\r\n")
	for _, l := range lines[min(1, len(lines)):] {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.EqualFold(strings.TrimSpace(k), key) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// parseDirect decodes a direct-get reply.
func parseDirect(subj string, m *nats.Msg) (rec, error) {
	if len(m.Data) == 0 {
		if st := m.Header.Get(hdrStatus); st != "" {
			if st == "404" {
				return rec{}, nil
			}
			return rec{}, fmt.Errorf("read %s: status %s %s: %w", subj, st, m.Header.Get(hdrDescription), engine.ErrUnavailable)
		}
	}
	seq, err := strconv.ParseUint(m.Header.Get(hdrSequence), 10, 64)
	if err != nil || seq == 0 {
		return rec{}, fmt.Errorf("read %s: reply without a stream sequence: %w", subj, engine.ErrCorrupt)
	}
	if m.Header.Get(hdrOp) == opDelete || len(m.Data) == 0 {
		return rec{seq: seq}, nil
	}
	return rec{seq: seq, data: m.Data}, nil
}

// apiError is the error of a JetStream API reply.
type apiError struct {
	Code        int    `json:"code"`
	ErrCode     int    `json:"err_code"`
	Description string `json:"description"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("jetstream: %s (code %d, err_code %d)", e.Description, e.Code, e.ErrCode)
}

type pubAckReply struct {
	Error *apiError `json:"error"`
	Seq   uint64    `json:"seq"`
}

// publish writes msgs: one message alone, several as one atomic batch.
// It returns the stream sequence of the last message; message i of n then
// has sequence last-(n-1-i).
func (s *Store) publish(ctx context.Context, msgs []outMsg) (uint64, error) {
	if err := s.usable(); err != nil {
		return 0, err
	}
	start := time.Now()
	seq, err := s.publishMsgs(ctx, msgs)
	s.metrics.published(len(msgs), time.Since(start), err)
	return seq, err
}

// publishMsgs is publish's work.
func (s *Store) publishMsgs(ctx context.Context, msgs []outMsg) (uint64, error) {
	ctx, cancel := s.reqCtx(ctx)
	defer cancel()
	if len(msgs) > 1 {
		select {
		case s.inflight <- struct{}{}:
			defer func() { <-s.inflight }()
		case <-ctx.Done():
			return 0, unavailable(ctx.Err())
		}
	}
	batchID := ""
	if len(msgs) > 1 {
		batchID = nuid.Next()
	}
	out := make([]*nats.Msg, len(msgs))
	limit := s.nc.MaxPayload()
	for i := range msgs {
		m := toNatsMsg(&msgs[i], s.sub.check())
		if batchID != "" {
			m.Header[hdrBatchID] = []string{batchID}
			m.Header[hdrBatchSeq] = []string{strconv.Itoa(i + 1)}
			if i == len(msgs)-1 {
				m.Header[hdrBatchCommit] = []string{"1"}
			}
		}
		// Checked before anything is sent: a batch cut short by a
		// message the server refuses stays open on the server until it
		// times out, and holds up the stream's other batches meanwhile
		// (every sidecar's; found by review).
		if size := msgSize(m); limit > 0 && size > limit {
			return 0, fmt.Errorf("publish %s: %d bytes, the server takes messages of at most %d (max_payload): %w",
				m.Subject, size, limit, engine.ErrTooLarge)
		}
		out[i] = m
	}
	for i, m := range out {
		if i < len(out)-1 {
			if err := s.nc.PublishMsg(m); err != nil {
				return 0, transportErr(err)
			}
			continue
		}
		reply, err := s.nc.RequestMsgWithContext(ctx, m)
		if err != nil {
			return 0, transportErr(err)
		}
		return parsePubAck(reply)
	}
	return 0, nil
}

// msgSize is the size the server counts against max_payload: the data
// and the header block as the client encodes it ("NATS/1.0\r\n", a
// "key: value\r\n" line per value, "\r\n").
func msgSize(m *nats.Msg) int64 {
	n := len("NATS/1.0\r\n\r\n") + len(m.Data)
	for k, vs := range m.Header {
		for _, v := range vs {
			n += len(k) + len(": ") + len(v) + len("\r\n")
		}
	}
	return int64(n)
}

// transportErr classifies an error of the client's publish: a message
// over the server's max_payload is too large (nothing a retry changes),
// anything else unavailable.
func transportErr(err error) error {
	if errors.Is(err, nats.ErrMaxPayload) {
		return fmt.Errorf("%w: %w", engine.ErrTooLarge, err)
	}
	return unavailable(err)
}

func toNatsMsg(o *outMsg, checkSubj string) *nats.Msg {
	m := &nats.Msg{Subject: o.subj, Header: make(nats.Header, 6), Data: o.data}
	m.Header[hdrExpSubjSeq] = []string{strconv.FormatUint(o.expect, 10)}
	switch {
	case o.checkSubj != "":
		m.Subject = checkSubj
		m.Header[hdrExpSubjSeqSubj] = []string{o.checkSubj}
	case o.del:
		m.Header[hdrOp] = []string{opDelete}
		m.Data = nil
	}
	return m
}

// parsePubAck decodes a publish acknowledgement.
func parsePubAck(m *nats.Msg) (uint64, error) {
	if len(m.Data) == 0 {
		if st := m.Header.Get(hdrStatus); st == "503" {
			return 0, fmt.Errorf("publish: no responders: %w", engine.ErrUnavailable)
		}
		return 0, fmt.Errorf("publish: empty acknowledgement: %w", engine.ErrUnavailable)
	}
	var r pubAckReply
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return 0, fmt.Errorf("publish: acknowledgement %q: %w", m.Data, engine.ErrUnavailable)
	}
	if r.Error != nil {
		switch r.Error.ErrCode {
		case errCodeWrongLastSeq, errCodeWrongLastSeqConstant:
			return 0, fmt.Errorf("%w: %w", errConflict, r.Error)
		case errCodeBatchIncomplete, errCodeBatchTooManyInflight:
			return 0, fmt.Errorf("%w: %w", errBusy, r.Error)
		case errCodeBatchTooLarge, errCodeMsgTooLarge:
			return 0, fmt.Errorf("%w: %w", engine.ErrTooLarge, r.Error)
		}
		return 0, fmt.Errorf("%w: %w", engine.ErrUnavailable, r.Error)
	}
	if r.Seq == 0 {
		return 0, fmt.Errorf("publish: acknowledgement without sequence %q: %w", m.Data, engine.ErrUnavailable)
	}
	return r.Seq, nil
}

// unavailable wraps a transport failure (timeout, no server, closed
// connection, cancelled context) as engine.ErrUnavailable.
func unavailable(err error) error {
	if err == nil || errors.Is(err, engine.ErrUnavailable) {
		return err
	}
	return fmt.Errorf("%w: %w", engine.ErrUnavailable, err)
}
