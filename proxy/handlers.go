package proxy

import (
	"bytes"
	"errors"
	"math"
	"strconv"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/internal/metrichelp"
)

// Paging of list endpoints.
const (
	defaultLimit = 50
	maxLimit     = 1000
)

// submitForeground is POST /v1/threads/{thread_id}/runs and POST /v1/runs
// (seed submit): an SSE stream of the run, or with Accept:
// application/json the submit result only.
func (s *Server) submitForeground(ctx *fasthttp.RequestCtx, thread string) error {
	req, err := decodeSubmit(ctx.PostBody(), thread)
	if err != nil {
		return err
	}
	if err := applyHeaders(ctx, &req); err != nil {
		return err
	}
	if err := s.writable(); err != nil {
		return err
	}
	asJSON := wantsJSON(ctx)
	// An idempotent repeat is the engine's to answer (Mailbox.Submit): it
	// follows the first's run, queued, running here or elsewhere. The
	// handler's own check followed a running run only, by the thread's
	// log (found by review: a queued one's repeat got `submitted` and an
	// ended stream).
	res, events, err := s.mb.Submit(s.base, req)
	if err != nil {
		return err
	}
	if asJSON {
		return s.writeJSON(ctx, fasthttp.StatusOK, res)
	}
	return s.startStream(ctx, res.ThreadID, events, 0, submittedEvent(res), &res)
}

// submitBackground is POST /v1/threads/{thread_id}/dispatches (seed
// submit_background): 202 with the submit result.
func (s *Server) submitBackground(ctx *fasthttp.RequestCtx, thread string) error {
	req, err := decodeSubmit(ctx.PostBody(), thread)
	if err != nil {
		return err
	}
	if err := applyHeaders(ctx, &req); err != nil {
		return err
	}
	if err := s.writable(); err != nil {
		return err
	}
	res, err := s.mb.SubmitBackground(s.base, req)
	if err != nil {
		return err
	}
	return s.writeJSON(ctx, fasthttp.StatusAccepted, res)
}

// messagesResult is the answer of POST …/messages.
type messagesResult struct {
	engine.SubmitResult
	Delivery engine.LiveDelivery `json:"delivery"`
}

// sendMessages is POST /v1/threads/{thread_id}/messages (seed
// submit_live_then_queue).
func (s *Server) sendMessages(ctx *fasthttp.RequestCtx, thread string) error {
	req, expected, err := decodeMessages(ctx.PostBody(), thread)
	if err != nil {
		return err
	}
	if err := applyHeaders(ctx, &req); err != nil {
		return err
	}
	if err := s.writable(); err != nil {
		return err
	}
	res, delivery, err := s.mb.SendMessages(s.base, req, expected)
	if err != nil {
		return err
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, messagesResult{SubmitResult: res, Delivery: delivery})
}

// interruptResult is the answer of POST …/interrupt.
type interruptResult struct {
	NewEpoch   uint64           `json:"new_dispatch_epoch"`
	Superseded int              `json:"superseded_count"`
	Active     *engine.Dispatch `json:"active_dispatch"`
}

// interrupt is POST /v1/threads/{thread_id}/interrupt (seed interrupt).
func (s *Server) interrupt(ctx *fasthttp.RequestCtx, thread string) error {
	if err := s.commandable(); err != nil {
		return err
	}
	res, err := s.mb.Interrupt(s.base, thread)
	if err != nil {
		return err
	}
	out := interruptResult{NewEpoch: res.NewEpoch, Superseded: res.SupersededN}
	active := ""
	if res.Active != nil {
		d := publicDispatch(*res.Active)
		out.Active = &d
		active = res.Active.DispatchID
	}
	// A client's command that ends work is an operator's trail (found by
	// review: interrupts, cancels and requeues left no line).
	s.log.Info("interrupt", "thread_id", thread, "superseded", res.SupersededN, "active_dispatch_id", active, "new_epoch", res.NewEpoch)
	return s.writeJSON(ctx, fasthttp.StatusOK, out)
}

// cancel is POST /v1/cancel/{id} (seed cancel): a dispatch, run or thread id.
func (s *Server) cancel(ctx *fasthttp.RequestCtx, id string) error {
	if err := s.commandable(); err != nil {
		return err
	}
	ok, err := s.mb.Cancel(s.base, id)
	if err != nil {
		return err
	}
	s.log.Info("cancel", "id", id, "cancelled", ok)
	return s.writeJSON(ctx, fasthttp.StatusOK, struct {
		Cancelled bool `json:"cancelled"`
	}{ok})
}

// sendDecision is POST /v1/runs/{id}/decisions (seed send_decision_live).
func (s *Server) sendDecision(ctx *fasthttp.RequestCtx, run string) error {
	d, err := decodeDecision(ctx.PostBody())
	if err != nil {
		return err
	}
	if err := s.commandable(); err != nil {
		return err
	}
	ok, err := s.mb.SendDecision(s.base, run, d)
	if err != nil {
		return err
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, struct {
		Delivered bool `json:"delivered"`
	}{ok})
}

// reattach is GET /v1/threads/{thread_id}/events (seed reconnect_sink):
// the thread's active or retained run, replayed after Last-Event-ID (or
// ?after=N). With ?run_id=R (the run the client followed), R is followed
// while it runs or waits queued behind another run, and a thread that
// moved on from it replays its run whole after a reset: ids are
// run-local, so R's last id would skip the next run's first events
// (found by review).
func (s *Server) reattach(ctx *fasthttp.RequestCtx, thread string) error {
	followed := string(ctx.QueryArgs().Peek("run_id"))
	if followed != "" {
		if err := engine.ValidateID("run_id", followed); err != nil {
			return err
		}
	}
	after := uint64(0)
	raw := ctx.Request.Header.Peek("Last-Event-ID")
	name := "Last-Event-ID"
	if len(bytes.TrimSpace(raw)) == 0 {
		raw, name = ctx.QueryArgs().Peek("after"), "after"
	}
	if raw = bytes.TrimSpace(raw); len(raw) > 0 {
		v, err := strconv.ParseUint(string(raw), 10, 64)
		if err != nil {
			return engine.Validationf("%s %q is not an event id (a non-negative integer)", name, raw)
		}
		after = v
	}
	var log *engine.EventLog
	var other bool
	var err error
	if followed != "" {
		log, other, err = s.mb.AttachRun(s.base, thread, followed, after)
	} else {
		log, err = s.mb.Attach(s.base, thread, after)
	}
	if err != nil {
		return err
	}
	if log == nil {
		return errNotFound("thread %s has no active or retained run", thread)
	}
	var head []byte
	if other {
		// The thread moved on from the run the client followed.
		head = appendReset(nil, "unknown_id", after, log.FirstSeq())
		after = 0
	}
	if head == nil && after >= log.NextSeqFloor() {
		// An id of an earlier run of the thread, or of a log numbered
		// apart: replay this one whole.
		head = appendReset(nil, "unknown_id", after, log.FirstSeq())
		after = 0
	}
	return s.startStream(ctx, thread, log, after, head, nil)
}

// getDispatch is GET /v1/dispatches/{dispatch_id}.
func (s *Server) getDispatch(ctx *fasthttp.RequestCtx, id string) error {
	d, err := s.mb.LoadDispatch(s.base, id)
	if err != nil {
		return err
	}
	if d == nil {
		return errNotFound("dispatch %s not found", id)
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, publicDispatch(*d))
}

// getRun is GET /v1/runs/{run_id}.
func (s *Server) getRun(ctx *fasthttp.RequestCtx, id string) error {
	r, err := s.mb.Store().LoadRun(s.base, id)
	if err != nil {
		return err
	}
	if r == nil {
		return errNotFound("run %s not found", id)
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, r)
}

// page is the answer of the list endpoints.
type page[T any] struct {
	Items      []T     `json:"items"`
	NextOffset *uint64 `json:"next_offset"`
}

// listDispatches is GET /v1/threads/{thread_id}/dispatches.
func (s *Server) listDispatches(ctx *fasthttp.RequestCtx, thread string) error {
	args := ctx.QueryArgs()
	limit, offset, err := paging(args)
	if err != nil {
		return err
	}
	filter, err := statusFilter(args.Peek("status"))
	if err != nil {
		return err
	}
	p, err := boundedPage(limit, offset, s.answerRoom(ctx), func(n, at int) ([]engine.Dispatch, error) {
		return s.mb.ListDispatches(s.base, thread, filter, n, at)
	})
	if err != nil {
		return s.pageError(ctx, err)
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, p)
}

// listDeadLetters is GET /v1/dead-letters (newest first).
func (s *Server) listDeadLetters(ctx *fasthttp.RequestCtx, _ string) error {
	limit, offset, err := paging(ctx.QueryArgs())
	if err != nil {
		return err
	}
	p, err := boundedPage(limit, offset, s.answerRoom(ctx), func(n, at int) ([]engine.Dispatch, error) {
		return s.mb.Store().ListDeadLetters(s.base, n, at)
	})
	if err != nil {
		return s.pageError(ctx, err)
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, p)
}

// pageBytes bounds the bytes of responses and errors in one page of
// dispatches: a page ends early once its dispatches hold that much
// (next_offset goes on from there), and it is read from the store a few
// dispatches at a time. A thread's twenty 16 MB responses made a 320 MB
// answer, and a page of the 1 000 allowed could have held 16 GB (found
// by review).
const pageBytes = 8 << 20

// pageChunk is how many items a page reads from the store at once at
// first; it doubles while they are small. One: a page learns how large
// its items are before it holds many of them (answerBudget).
const pageChunk = 1

// boundedPage reads a page of at most limit dispatches from offset with
// list (n dispatches from an offset), ending it early at pageBytes or
// when room (the answer budget's reservation) refuses an item; it fails
// with errNoAnswerRoom when there is no room for a first item.
func boundedPage(limit, offset int, room func(n int) bool, list func(n, at int) ([]engine.Dispatch, error)) (page[engine.Dispatch], error) {
	p := page[engine.Dispatch]{Items: []engine.Dispatch{}}
	held, chunk := 0, pageChunk
	if !room(answerFree) {
		return p, errNoAnswerRoom // full before anything is read
	}
	for {
		want := min(chunk, limit+1-len(p.Items)) // one past the page: is there more?
		ds, err := list(want, offset+len(p.Items))
		if err != nil {
			return p, err
		}
		for i := range ds {
			if len(p.Items) == limit || (held >= pageBytes && len(p.Items) > 0) {
				next := uint64(offset + len(p.Items))
				p.NextOffset = &next
				return p, nil
			}
			n := dispatchBytes(&ds[i])
			if !room(n) {
				if len(p.Items) == 0 {
					return p, errNoAnswerRoom
				}
				next := uint64(offset + len(p.Items))
				p.NextOffset = &next
				return p, nil
			}
			p.Items = append(p.Items, publicDispatch(ds[i]))
			held += n
		}
		if len(ds) < want {
			return p, nil // the end
		}
		if held < len(p.Items)*(64<<10) {
			chunk = min(2*chunk, 256)
		}
	}
}

// dispatchBytes is what a dispatch's texts weigh in a page.
func dispatchBytes(d *engine.Dispatch) int {
	n := len(d.RunResponse) + len(d.LastError) + len(d.RunError)
	for i := range d.Errors {
		n += len(d.Errors[i].Error)
	}
	return n
}

// listMessages is GET /v1/threads/{thread_id}/messages?after_seq=&limit=.
func (s *Server) listMessages(ctx *fasthttp.RequestCtx, thread string) error {
	args := ctx.QueryArgs()
	limit, _, err := paging(args)
	if err != nil {
		return err
	}
	after := uint64(0)
	if raw := args.Peek("after_seq"); len(raw) > 0 {
		if after, err = strconv.ParseUint(string(raw), 10, 64); err != nil {
			return engine.Validationf("after_seq %q is not a non-negative integer", raw)
		}
	}
	p, err := s.messagePage(thread, after, limit, s.answerRoom(ctx))
	if err != nil {
		return s.pageError(ctx, err)
	}
	return s.writeJSON(ctx, fasthttp.StatusOK, p)
}

// messagePage reads a page of at most limit messages of thread after
// seq after, ending it early once its messages hold pageBytes (at least
// one message a page): a page of the 1 000 allowed, of messages up to
// the agent frame limit each, could have held gigabytes. It reads a few
// messages at a time, more while they are small.
func (s *Server) messagePage(thread string, after uint64, limit int, room func(n int) bool) (page[engine.MessageRecord], error) {
	p := page[engine.MessageRecord]{Items: []engine.MessageRecord{}}
	held, chunk := 0, uint64(pageChunk)
	if !room(answerFree) {
		return p, errNoAnswerRoom // full before anything is read
	}
	for from := after + 1; from > after; { // from wraps past the last seq
		want := min(chunk, uint64(limit+1-len(p.Items))) // one past the page: is there more?
		to := from + want - 1
		if to < from {
			to = math.MaxUint64
		}
		recs, err := s.mb.Store().LoadMessageRange(s.base, thread, from, to)
		if err != nil {
			return p, err
		}
		for i := range recs {
			if len(p.Items) == limit || (held >= pageBytes && len(p.Items) > 0) {
				next := p.Items[len(p.Items)-1].Seq
				p.NextOffset = &next
				return p, nil
			}
			n := messageBytes(&recs[i].Message)
			if !room(n) {
				if len(p.Items) == 0 {
					return p, errNoAnswerRoom
				}
				next := p.Items[len(p.Items)-1].Seq
				p.NextOffset = &next
				return p, nil
			}
			p.Items = append(p.Items, recs[i])
			held += n
		}
		if uint64(len(recs)) < want {
			return p, nil // the end
		}
		from = recs[len(recs)-1].Seq + 1
		if held < len(p.Items)*(64<<10) {
			chunk = min(2*chunk, 256)
		}
	}
	return p, nil
}

// messageBytes is what a message's texts weigh in a page.
func messageBytes(m *engine.Message) int {
	return len(m.ID) + len(m.Role) + len(m.Content) + len(m.ToolCalls) + len(m.ToolCallID) + len(m.Metadata)
}

// requeue is POST /v1/dispatches/{dispatch_id}/requeue: a dead letter back
// to the queue as a new dispatch of the same run (200, the new dispatch).
func (s *Server) requeue(ctx *fasthttp.RequestCtx, id string) error {
	if err := s.writable(); err != nil {
		return err
	}
	d, err := s.mb.Requeue(s.base, id)
	if err != nil {
		return err
	}
	s.log.Info("requeue", "dead_letter_id", id, "dispatch_id", d.DispatchID, "thread_id", d.ThreadID, "run_id", d.RunID)
	return s.writeJSON(ctx, fasthttp.StatusOK, publicDispatch(d))
}

// metrics is GET /metrics: the server's set, Config.Metrics, and the
// process metrics, in the Prometheus text format, the sidecar's families
// with their HELP text (metrichelp).
func (s *Server) metrics(ctx *fasthttp.RequestCtx, _ string) error {
	ctx.SetContentType("text/plain; version=0.0.4; charset=utf-8")
	var scrape bytes.Buffer
	s.m.set.WritePrometheus(&scrape)
	for _, set := range s.cfg.Metrics {
		set.WritePrometheus(&scrape)
	}
	metrics.WriteProcessMetrics(&scrape)
	ctx.Response.SetBodyRaw(metrichelp.Fill(make([]byte, 0, scrape.Len()+8<<10), scrape.Bytes()))
	return nil
}

// livez is GET /livez: 200 while the server and, through Config.Live,
// the engine's loops and the store respond; 503 with the reason when one
// is stuck.
func (s *Server) livez(ctx *fasthttp.RequestCtx, _ string) error {
	if s.cfg.Live != nil {
		if err := s.cfg.Live(); err != nil {
			return s.writeJSON(ctx, fasthttp.StatusServiceUnavailable, struct {
				Live  bool   `json:"live"`
				Error string `json:"error"`
			}{false, err.Error()})
		}
	}
	ctx.SetContentType("application/json")
	ctx.SetBodyString(`{"live":true}`)
	return nil
}

// readyz is GET /readyz and /healthz: 200 or 503 with the Readiness.
func (s *Server) readyz(ctx *fasthttp.RequestCtx, _ string) error {
	r := s.cfg.Ready()
	if s.isClosing() {
		r.Ready = false
	}
	if r.Checks == nil {
		r.Checks = map[string]bool{}
	}
	status := fasthttp.StatusOK
	if !r.Ready {
		status = fasthttp.StatusServiceUnavailable
	}
	return s.writeJSON(ctx, status, r)
}

// paging parses limit (default 50, capped at 1000, at least 1) and offset
// (default 0).
func paging(args *fasthttp.Args) (limit, offset int, err error) {
	limit = defaultLimit
	if raw := args.Peek("limit"); len(raw) > 0 {
		v, perr := strconv.ParseInt(string(raw), 10, 64)
		if errors.Is(perr, strconv.ErrRange) && v > 0 {
			perr = nil // beyond int64: capped like any large limit
		}
		if perr != nil || v < 1 {
			return 0, 0, engine.Validationf("limit %q is not a positive integer", raw)
		}
		limit = int(min(v, maxLimit))
	}
	if raw := args.Peek("offset"); len(raw) > 0 {
		v, perr := strconv.ParseInt(string(raw), 10, 64)
		if perr != nil || v < 0 || v > math.MaxInt32 {
			return 0, 0, engine.Validationf("offset %q is not an integer from 0 to %d", raw, math.MaxInt32)
		}
		offset = int(v)
	}
	return limit, offset, nil
}

// statusFilter parses a comma-separated list of dispatch statuses; empty
// selects every status.
func statusFilter(raw []byte) (engine.StatusFilter, error) {
	if len(raw) == 0 {
		return nil, nil
	}
	var f engine.StatusFilter
	for part := range bytes.SplitSeq(raw, []byte{','}) {
		st, err := engine.ParseDispatchStatus(string(bytes.TrimSpace(part)))
		if err != nil {
			return nil, err
		}
		f = append(f, st)
	}
	return f, nil
}

// publicDispatch is a dispatch as clients see it: without its claim token.
func publicDispatch(d engine.Dispatch) engine.Dispatch {
	d.ClaimToken = ""
	return d
}

// applyHeaders carries the Idempotency-Key header into dedupe_key (it
// wins over the body) and a valid traceparent header to the agent.
func applyHeaders(ctx *fasthttp.RequestCtx, req *engine.SubmitRequest) error {
	if key := ctx.Request.Header.Peek("Idempotency-Key"); len(key) > 0 {
		if err := engine.ValidateID("Idempotency-Key", string(key)); err != nil {
			return err
		}
		req.DedupeKey = string(key)
	}
	if tp := ctx.Request.Header.Peek("traceparent"); validTraceparent(tp) {
		req.Traceparent = string(tp)
	}
	return nil
}

// validTraceparent reports whether tp is a W3C traceparent of version 00:
// 00-<32 hex trace id, not all zero>-<16 hex parent id, not all zero>-<2 hex flags>.
func validTraceparent(tp []byte) bool {
	if len(tp) != 55 || tp[0] != '0' || tp[1] != '0' || tp[2] != '-' || tp[35] != '-' || tp[52] != '-' {
		return false
	}
	hex := func(b []byte) (ok, zero bool) {
		zero = true
		for _, c := range b {
			switch {
			case c >= '0' && c <= '9', c >= 'a' && c <= 'f':
			default:
				return false, false
			}
			if c != '0' {
				zero = false
			}
		}
		return true, zero
	}
	trace, tz := hex(tp[3:35])
	parent, pz := hex(tp[36:52])
	flags, _ := hex(tp[53:55])
	return trace && parent && flags && !tz && !pz
}

// wantsJSON reports whether a foreground submit asked for the submit
// result only (Accept: application/json, without text/event-stream).
// Media types are compared without regard to case (RFC 9110 §8.3.1).
func wantsJSON(ctx *fasthttp.RequestCtx) bool {
	a := ctx.Request.Header.Peek(fasthttp.HeaderAccept)
	return containsFold(a, "application/json") && !containsFold(a, "text/event-stream")
}

// containsFold reports whether sub (lower-case ASCII) is within s, ASCII
// letters compared without regard to case.
func containsFold(s []byte, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		j := 0
		for ; j < len(sub); j++ {
			c := s[i+j]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != sub[j] {
				break
			}
		}
		if j == len(sub) {
			return true
		}
	}
	return false
}
