package crash

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Kinds of accepted dispatches.
const (
	kindBackground = "background"
	kindForeground = "foreground"
	kindQueuedLive = "queued_live" // a live message no run took
	kindResume     = "resume"      // decisions-only submit
)

// accepted is a dispatch the API accepted: 2xx with its dispatch_id.
type accepted struct {
	ID, Thread, RunID string
	Kind              string
	Cmd               Command
	AcceptedNs        int64 // when the answer arrived
	SentNs            int64 // when the request was sent
	checked           bool  // seen to exist after a restart
	// Superseded: a foreground submit answered status cancelled (taken,
	// then superseded by a concurrent foreground submit before it
	// started): the sidecar cancelled it, or the other submit's interrupt
	// superseded it first, and said so.
	Superseded bool
}

// interruptRec is an interrupt the API acknowledged, or a foreground
// submit (which interrupts its thread) that reached `submitted`.
type interruptRec struct {
	Thread             string
	SentNs, ReturnedNs int64
	Own                string // the foreground submit's own dispatch (exempt)
	Via                string // the sidecar that answered it (api.node)
	// Active is the dispatch a plain interrupt found claimed: its attempt
	// may already be on its way to the agent (it is cancelled, not
	// superseded before it started), so one attempt of it may start
	// after the interrupt returned; a foreground submit awaits it.
	Active string
	// ActiveInstance is the active dispatch's dispatch_instance_id: the
	// only attempt that may be on its way to the agent.
	ActiveInstance string
}

// cancelRec is a cancel of a dispatch id the API answered.
type cancelRec struct {
	Dispatch, Thread   string
	SentNs, ReturnedNs int64
	Cancelled          bool
	Via                string // the sidecar that answered it (api.node)
}

// liveRec is a live command the API answered as delivered to a running
// run: messages answered `delivery: live` (Kind EventLive) or a decision
// answered `delivered:true` (Kind EventDecision).
type liveRec struct {
	Kind, Thread, RunID string
	Texts               []string // live: the messages' texts, in order
	CallID              string   // decision: its tool call
	SentNs, AnsweredNs  int64
	Via                 string // the sidecar that answered it (api.node)
}

// tryRec is an interrupt, foreground submit or cancel as sent; EndNs is
// when it was answered, MaxInt64 when no answer came (it may have landed).
type tryRec struct {
	Kind, Thread, Dispatch string
	SentNs, EndNs          int64
}

func (r *recorder) try(kind, thread, dispatch string) *tryRec {
	t := &tryRec{Kind: kind, Thread: thread, Dispatch: dispatch, SentNs: time.Now().UnixNano(), EndNs: math.MaxInt64}
	r.mu.Lock()
	r.tries = append(r.tries, t)
	r.mu.Unlock()
	return t
}

func (r *recorder) answered(t *tryRec) {
	r.mu.Lock()
	t.EndNs = time.Now().UnixNano()
	r.mu.Unlock()
}

// textRec is a message text the harness sent (each unique by its nonce).
type textRec struct {
	Thread     string
	Accepted   bool // the API answered 2xx: the message must be in the log
	SentNs     int64
	AnsweredNs int64 // when the 2xx answer arrived (0: none)
	checked    bool
}

// requestRec is a request that carried messages: their texts in order,
// when it was sent and when it was answered 2xx (0 if it was not).
type requestRec struct {
	Thread             string
	Texts              []string
	SentNs, AnsweredNs int64
}

// requestTexts are the texts of a request of n messages: the command's
// text, then the same text with " /2" … " /n" (unique by the nonce; they
// parse as no command, so the agent executes the first).
func requestTexts(text string, n int) []string {
	out := []string{text}
	for i := 2; i <= n; i++ {
		out = append(out, fmt.Sprintf("%s /%d", text, i))
	}
	return out
}

// userTexts is a request's messages, one user text each, in order.
func userTexts(texts []string) []message {
	out := make([]message, len(texts))
	for i, t := range texts {
		out[i] = message{Role: "user", Content: t}
	}
	return out
}

// streamRec is a foreground stream as read: its run, when its request
// was sent, and the id and type of every event with an id but the
// `submitted` one, in order.
type streamRec struct {
	Thread, RunID, Dispatch string
	SentNs                  int64
	Events                  []streamEvent
}

type streamEvent struct {
	ID   uint64
	Type string
}

// recorder keeps everything the workload did and the API acknowledged.
type recorder struct {
	mu         sync.Mutex
	accepted   map[string]*accepted
	order      []*accepted
	byThread   map[string][]*accepted
	interrupts []interruptRec
	cancels    []cancelRec
	delivered  []liveRec     // live messages and decisions answered delivered
	requests   []*requestRec // every request that carried messages
	texts      map[string]*textRec
	suspends   []*accepted // accepted suspend commands: targets of decisions
	tries      []*tryRec   // every interrupt, foreground submit and cancel sent
	ops        map[string]int
	killEpoch  map[*api]int // kills of each sidecar (by its client): a stream cut by a kill of its sidecar is no fault
	streams    struct{ total, finished, cut, timedOut int }
	fgStreams  []streamRec // foreground streams that reached `submitted`
	problems   []string    // faults seen while the workload ran
}

func newRecorder() *recorder {
	return &recorder{accepted: map[string]*accepted{}, byThread: map[string][]*accepted{},
		texts: map[string]*textRec{}, ops: map[string]int{}, killEpoch: map[*api]int{}}
}

func (r *recorder) op(name string) {
	r.mu.Lock()
	r.ops[name]++
	r.mu.Unlock()
}

func (r *recorder) problem(format string, args ...any) {
	r.mu.Lock()
	r.problems = append(r.problems, fmt.Sprintf(format, args...))
	r.mu.Unlock()
}

// request records a request of texts on thread as sent.
func (r *recorder) request(thread string, texts []string) *requestRec {
	now := time.Now().UnixNano()
	q := &requestRec{Thread: thread, Texts: texts, SentNs: now}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, text := range texts {
		r.texts[text] = &textRec{Thread: thread, SentNs: now}
	}
	r.requests = append(r.requests, q)
	return q
}

// requestAccepted records that q was answered 2xx at now.
func (r *recorder) requestAccepted(q *requestRec, now int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	q.AnsweredNs = now
	for _, text := range q.Texts {
		if t := r.texts[text]; t != nil {
			t.Accepted, t.AnsweredNs = true, now
		}
	}
}

func (r *recorder) accept(a *accepted) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if old := r.accepted[a.ID]; old != nil {
		r.problems = append(r.problems, fmt.Sprintf("dispatch %s accepted twice (%s, then %s)", a.ID, old.Kind, a.Kind))
		return
	}
	r.accepted[a.ID] = a
	r.order = append(r.order, a)
	r.byThread[a.Thread] = append(r.byThread[a.Thread], a)
	if a.Cmd.Verb == VerbSuspend {
		r.suspends = append(r.suspends, a)
		if len(r.suspends) > 64 {
			r.suspends = r.suspends[1:]
		}
	}
}

// recentOf returns one of the last few dispatches accepted on thread.
func (r *recorder) recentOf(thread string, rng *rand.Rand) *accepted {
	r.mu.Lock()
	defer r.mu.Unlock()
	l := r.byThread[thread]
	if len(l) == 0 {
		return nil
	}
	n := min(len(l), 6)
	return l[len(l)-1-rng.IntN(n)]
}

func (r *recorder) recentSuspend(rng *rand.Rand) *accepted {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.suspends) == 0 {
		return nil
	}
	return r.suspends[rng.IntN(len(r.suspends))]
}

// kills is the number of kills of the sidecar a speaks to so far.
func (r *recorder) kills(a *api) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.killEpoch[a]
}

// sidecarKilled notes a kill of the sidecar a speaks to (its streams open
// across it may be cut).
func (r *recorder) sidecarKilled(a *api) {
	r.mu.Lock()
	r.killEpoch[a]++
	r.mu.Unlock()
}

// all returns the accepted dispatches in acceptance order.
func (r *recorder) all() []*accepted {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*accepted(nil), r.order...)
}

// threads returns the threads the workload touched, sorted.
func (r *recorder) threadsTouched() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[string]bool{}
	for _, t := range r.texts {
		seen[t.Thread] = true
	}
	for t := range r.byThread {
		seen[t] = true
	}
	out := make([]string, 0, len(seen))
	for t := range seen {
		out = append(out, t)
	}
	sort.Strings(out)
	return out
}

// workloadOptions shape a workload.
type workloadOptions struct {
	prefix  string // nonce and thread prefix, unique per test
	threads int
	workers int
	// pause between a worker's operations: uniform in [minPause, maxPause)
	minPause, maxPause time.Duration
	// foreground, interrupts, cancels, live, decisions, resume are the
	// percentages of those operations; the rest are background submits.
	foreground, interrupts, cancels, live, decisions, resume int
}

func defaultWorkload(prefix string) workloadOptions {
	return workloadOptions{prefix: prefix, threads: 24, workers: 6, minPause: 10 * time.Millisecond, maxPause: 70 * time.Millisecond,
		foreground: 10, interrupts: 5, cancels: 6, live: 12, decisions: 12, resume: 4}
}

// workload drives the client API from several goroutines; with several
// sidecars sharing a store, each operation goes to one of them at random.
type workload struct {
	apis    []*api
	rec     *recorder
	o       workloadOptions
	threads []string
	nonce   atomic.Int64
	stop    chan struct{}
	halted  sync.Once
	wg      sync.WaitGroup
	seed    uint64
}

func newWorkload(rec *recorder, o workloadOptions, apis ...*api) *workload {
	w := &workload{apis: apis, rec: rec, o: o, stop: make(chan struct{}), seed: uint64(time.Now().UnixNano())}
	for i := range o.threads {
		w.threads = append(w.threads, fmt.Sprintf("%s-t%02d", o.prefix, i))
	}
	return w
}

// start starts the workers.
func (w *workload) start() {
	for i := range w.o.workers {
		w.wg.Add(1)
		go w.worker(rand.New(rand.NewPCG(w.seed, uint64(i))))
	}
}

// halt stops the workers and waits for them (open streams end by their
// deadline at the latest). It may be called more than once.
func (w *workload) halt() {
	w.halted.Do(func() { close(w.stop) })
	w.wg.Wait()
}

func (w *workload) stopped() bool {
	select {
	case <-w.stop:
		return true
	default:
		return false
	}
}

func (w *workload) worker(rng *rand.Rand) {
	defer w.wg.Done()
	for !w.stopped() {
		thread := w.threads[rng.IntN(len(w.threads))]
		a := w.apis[rng.IntN(len(w.apis))]
		p := rng.IntN(100)
		var err error
		o := w.o
		switch {
		case p < o.foreground:
			err = w.foreground(a, thread, rng)
		case p < o.foreground+o.interrupts:
			err = w.interrupt(a, thread)
		case p < o.foreground+o.interrupts+o.cancels:
			err = w.cancel(a, thread, rng)
		case p < o.foreground+o.interrupts+o.cancels+o.live:
			err = w.liveMessage(a, thread, messageCount(rng))
		case p < o.foreground+o.interrupts+o.cancels+o.live+o.decisions:
			err = w.decide(a, rng)
		case p < o.foreground+o.interrupts+o.cancels+o.live+o.decisions+o.resume:
			err = w.resume(a, thread)
		default:
			err = w.backgroundN(a, thread, w.randomCommand(rng), messageCount(rng))
		}
		pause := o.minPause + time.Duration(rng.Int64N(int64(o.maxPause-o.minPause)+1))
		if err != nil {
			pause = max(pause, 50*time.Millisecond) // the sidecar is down or refusing
		}
		select {
		case <-w.stop:
		case <-time.After(pause):
		}
	}
}

func (w *workload) newNonce() string {
	return fmt.Sprintf("n-%s-%d", w.o.prefix, w.nonce.Add(1))
}

// randomCommand picks what a background run does.
func (w *workload) randomCommand(rng *rand.Rand) Command {
	c := Command{Nonce: w.newNonce()}
	switch p := rng.IntN(100); {
	case p < 25:
		c.Verb, c.Arg = VerbSleep, 10+rng.IntN(290)
	case p < 55:
		c.Verb, c.Arg, c.Arg2 = VerbCheckpoint, 1+rng.IntN(5), rng.IntN(60)
	case p < 65:
		c.Verb, c.Arg = VerbSuspend, 200+rng.IntN(1300)
	case p < 75:
		c.Verb, c.Arg = VerbTransient, 1+rng.IntN(2)
	case p < 77:
		c.Verb, c.Arg = VerbTransient, 1000 // fails every attempt: dead letter
	case p < 82:
		c.Verb = VerbPermanent
	default:
		c.Verb = VerbDone
	}
	return c
}

func reqCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 15*time.Second)
}

// messageCount is how many messages a background submit or live message
// carries: 1, sometimes 2 or 3.
func messageCount(rng *rand.Rand) int {
	switch p := rng.IntN(100); {
	case p < 20:
		return 2
	case p < 30:
		return 3
	}
	return 1
}

// background is POST /v1/threads/{t}/dispatches with one message, to the
// first sidecar.
func (w *workload) background(thread string, cmd Command) error {
	return w.backgroundN(w.apis[0], thread, cmd, 1)
}

// backgroundN is POST /v1/threads/{t}/dispatches with n messages, the
// command first.
func (w *workload) backgroundN(a *api, thread string, cmd Command, n int) error {
	w.rec.op("background")
	q := w.rec.request(thread, requestTexts(cmd.String(), n))
	sentNs := q.SentNs
	ctx, cancel := reqCtx()
	defer cancel()
	var res submitResult
	err := a.do(ctx, http.MethodPost, "/v1/threads/"+url.PathEscape(thread)+"/dispatches", map[string]any{"messages": userTexts(q.Texts)}, &res)
	if err != nil {
		w.checkRefusal("background submit", err)
		return err
	}
	now := time.Now().UnixNano()
	w.rec.requestAccepted(q, now)
	if res.DispatchID == "" || res.ThreadID != thread {
		w.rec.problem("background submit answered %+v", res)
		return nil
	}
	w.rec.accept(&accepted{ID: res.DispatchID, Thread: thread, RunID: res.RunID, Kind: kindBackground, Cmd: cmd, AcceptedNs: now, SentNs: sentNs})
	return nil
}

// checkRefusal records a refusal the API must never give: anything but
// 503 (down, not ready, disk full) and 409 (conflict) is a fault.
func (w *workload) checkRefusal(what string, err error) {
	switch st := statusOf(err); st {
	case 0:
		w.rec.op(what + " failed") // no answer: the sidecar is down or died under it
	case http.StatusServiceUnavailable, http.StatusConflict:
		w.rec.op(fmt.Sprintf("%s %d", what, st))
	default:
		w.rec.problem("%s: %v", what, err)
	}
}

// foreground is POST /v1/threads/{t}/runs, reading the SSE stream until
// run_finish.
func (w *workload) foreground(a *api, thread string, rng *rand.Rand) error {
	w.rec.op("foreground")
	cmd := Command{Nonce: w.newNonce()}
	switch rng.IntN(3) {
	case 0:
		cmd.Verb, cmd.Arg = VerbSleep, 10+rng.IntN(200)
	case 1:
		cmd.Verb, cmd.Arg, cmd.Arg2 = VerbCheckpoint, 1+rng.IntN(3), rng.IntN(40)
	default:
		cmd.Verb = VerbDone
	}
	text := cmd.String()
	q := w.rec.request(thread, []string{text})
	kills := w.rec.kills(a)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sent := time.Now().UnixNano()
	fgTry := w.rec.try("foreground", thread, "")
	resp, err := a.send(ctx, http.MethodPost, "/v1/threads/"+url.PathEscape(thread)+"/runs", map[string]any{"messages": userText(text)})
	if err != nil {
		w.checkRefusal("foreground submit", err)
		return err
	}
	defer resp.Body.Close()
	var got *accepted
	finished, reset := false, false
	last := ""
	var seen []streamEvent
	rerr := readSSE(resp.Body, func(ev sseEvent) bool {
		last = ev.Event
		if ev.ID != "" && ev.Event != "submitted" {
			id, err := strconv.ParseUint(ev.ID, 10, 64)
			if err != nil {
				w.rec.problem("foreground stream on %s: event %s with id %q", thread, ev.Event, ev.ID)
				return false
			}
			seen = append(seen, streamEvent{ID: id, Type: ev.Event})
		}
		switch ev.Event {
		case "reset":
			// The sidecar dropped a reader that fell behind its ring
			// (documented: the client re-attaches); not a lost finish.
			reset = true
		case "submitted":
			var res submitResult
			if err := json.Unmarshal([]byte(ev.Data), &res); err != nil || res.DispatchID == "" {
				w.rec.problem("foreground submitted event %q: %v", ev.Data, err)
				return false
			}
			now := time.Now().UnixNano()
			w.rec.requestAccepted(q, now)
			w.rec.answered(fgTry)
			w.rec.mu.Lock()
			fgTry.Dispatch = res.DispatchID
			w.rec.mu.Unlock()
			got = &accepted{ID: res.DispatchID, Thread: thread, RunID: res.RunID, Kind: kindForeground, Cmd: cmd, AcceptedNs: now, SentNs: sent, Superseded: res.Status == "cancelled"}
			w.rec.accept(got)
			w.rec.mu.Lock()
			w.rec.interrupts = append(w.rec.interrupts, interruptRec{Thread: thread, SentNs: sent, ReturnedNs: now, Own: res.DispatchID, Via: a.node})
			w.rec.mu.Unlock()
		case "run_finish":
			finished = true
			return false
		}
		return true
	})
	if !finished && !reset && ctx.Err() == nil {
		// The stream ended early. A kill under way counts only once the
		// killer has reaped the process, which can come after this EOF
		// (a request sent between the kill's two counts reads the first
		// and can see the EOF before the second): give it time to count.
		for deadline := time.Now().Add(5 * time.Second); w.rec.kills(a) == kills && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
	}
	w.rec.mu.Lock()
	defer w.rec.mu.Unlock()
	if got != nil {
		w.rec.fgStreams = append(w.rec.fgStreams, streamRec{Thread: thread, RunID: got.RunID, Dispatch: got.ID, SentNs: sent, Events: seen})
	}
	w.rec.streams.total++
	switch {
	case finished:
		w.rec.streams.finished++
	case w.rec.killEpoch[a] != kills, reset:
		w.rec.streams.cut++ // the sidecar died under the stream, or dropped a slow reader
	case ctx.Err() != nil:
		w.rec.streams.timedOut++
		w.rec.problems = append(w.rec.problems, fmt.Sprintf("foreground stream of %s on %s open for 30 s without run_finish", text, thread))
	case got == nil:
		w.rec.problems = append(w.rec.problems, fmt.Sprintf("foreground stream of %s on %s ended without submitted (%v)", text, thread, rerr))
	default:
		w.rec.problems = append(w.rec.problems, fmt.Sprintf("foreground stream of dispatch %s ended without run_finish, no sidecar kill meanwhile (%v; last event %q)", got.ID, rerr, last))
	}
	return nil
}

// interrupt is POST /v1/threads/{t}/interrupt.
func (w *workload) interrupt(a *api, thread string) error {
	w.rec.op("interrupt")
	ctx, cancel := reqCtx()
	defer cancel()
	sent := time.Now().UnixNano()
	tr := w.rec.try("interrupt", thread, "")
	var res struct {
		NewEpoch uint64 `json:"new_dispatch_epoch"`
		Active   *struct {
			DispatchID string `json:"dispatch_id"`
			InstanceID string `json:"dispatch_instance_id"`
		} `json:"active_dispatch"`
	}
	if err := a.do(ctx, http.MethodPost, "/v1/threads/"+url.PathEscape(thread)+"/interrupt", nil, &res); err != nil {
		w.checkRefusal("interrupt", err)
		return err
	}
	w.rec.answered(tr)
	now := time.Now().UnixNano()
	active, inst := "", ""
	if res.Active != nil {
		active, inst = res.Active.DispatchID, res.Active.InstanceID
	}
	w.rec.mu.Lock()
	w.rec.interrupts = append(w.rec.interrupts, interruptRec{Thread: thread, SentNs: sent, ReturnedNs: now, Active: active, ActiveInstance: inst, Via: a.node})
	w.rec.mu.Unlock()
	return nil
}

// cancel is POST /v1/cancel/{dispatch_id} of a recent dispatch.
func (w *workload) cancel(via *api, thread string, rng *rand.Rand) error {
	a := w.rec.recentOf(thread, rng)
	if a == nil {
		return nil
	}
	w.rec.op("cancel")
	ctx, cancel := reqCtx()
	defer cancel()
	sent := time.Now().UnixNano()
	tr := w.rec.try("cancel", thread, a.ID)
	var res struct {
		Cancelled bool `json:"cancelled"`
	}
	if err := via.do(ctx, http.MethodPost, "/v1/cancel/"+url.PathEscape(a.ID), nil, &res); err != nil {
		w.checkRefusal("cancel", err)
		return err
	}
	w.rec.answered(tr)
	now := time.Now().UnixNano()
	w.rec.mu.Lock()
	w.rec.cancels = append(w.rec.cancels, cancelRec{Dispatch: a.ID, Thread: thread, SentNs: sent, ReturnedNs: now, Cancelled: res.Cancelled, Via: via.node})
	w.rec.mu.Unlock()
	return nil
}

// liveMessage is POST /v1/threads/{t}/messages: live to the running run,
// else queued as a new dispatch.
func (w *workload) liveMessage(a *api, thread string, n int) error {
	w.rec.op("live")
	cmd := Command{Nonce: w.newNonce(), Verb: VerbLive}
	q := w.rec.request(thread, requestTexts(cmd.String(), n))
	sentNs := q.SentNs
	ctx, cancel := reqCtx()
	defer cancel()
	var res submitResult
	if err := a.do(ctx, http.MethodPost, "/v1/threads/"+url.PathEscape(thread)+"/messages", map[string]any{"messages": userTexts(q.Texts)}, &res); err != nil {
		w.checkRefusal("live message", err)
		return err
	}
	now := time.Now().UnixNano()
	w.rec.requestAccepted(q, now)
	switch res.Delivery {
	case "live":
		w.rec.op("live delivered")
		w.rec.mu.Lock()
		w.rec.delivered = append(w.rec.delivered, liveRec{Kind: EventLive, Thread: thread, RunID: res.RunID, Texts: q.Texts, SentNs: sentNs, AnsweredNs: now, Via: a.node})
		w.rec.mu.Unlock()
	case "queued":
		w.rec.op("live queued")
		w.rec.accept(&accepted{ID: res.DispatchID, Thread: thread, RunID: res.RunID, Kind: kindQueuedLive, Cmd: cmd, AcceptedNs: now, SentNs: sentNs})
	default:
		w.rec.problem("live message answered %+v", res)
	}
	return nil
}

// decide is POST /v1/runs/{run}/decisions for a recent suspend run.
func (w *workload) decide(via *api, rng *rand.Rand) error {
	a := w.rec.recentSuspend(rng)
	if a == nil {
		return nil
	}
	w.rec.op("decision")
	sentNs := time.Now().UnixNano()
	ctx, cancel := reqCtx()
	defer cancel()
	var res struct {
		Delivered bool `json:"delivered"`
	}
	body := map[string]any{"tool_call_id": SuspendCallID, "resume": map[string]bool{"approved": true}}
	if err := via.do(ctx, http.MethodPost, "/v1/runs/"+url.PathEscape(a.RunID)+"/decisions", body, &res); err != nil {
		w.checkRefusal("decision", err)
		return err
	}
	if res.Delivered {
		w.rec.op("decision delivered")
		w.rec.mu.Lock()
		w.rec.delivered = append(w.rec.delivered, liveRec{Kind: EventDecision, Thread: a.Thread, RunID: a.RunID, CallID: SuspendCallID, SentNs: sentNs, AnsweredNs: time.Now().UnixNano(), Via: via.node})
		w.rec.mu.Unlock()
	}
	return nil
}

// resume submits the decision for a waiting run of the thread: a
// decisions-only background submit, which continues the waiting run (or,
// with none waiting, starts a run that just completes).
func (w *workload) resume(a *api, thread string) error {
	w.rec.op("resume")
	sentNs := time.Now().UnixNano()
	ctx, cancel := reqCtx()
	defer cancel()
	var res submitResult
	body := map[string]any{"messages": []message{}, "decisions": []map[string]any{{"call_id": SuspendCallID, "resume": true}}}
	if err := a.do(ctx, http.MethodPost, "/v1/threads/"+url.PathEscape(thread)+"/dispatches", body, &res); err != nil {
		w.checkRefusal("resume", err)
		return err
	}
	w.rec.accept(&accepted{ID: res.DispatchID, Thread: thread, RunID: res.RunID, Kind: kindResume,
		Cmd: Command{Nonce: "n-none", Verb: VerbDone}, AcceptedNs: time.Now().UnixNano(), SentNs: sentNs})
	return nil
}
