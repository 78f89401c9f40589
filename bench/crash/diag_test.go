package crash

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// Diagnosis of a failed run. A LOST or UNJUSTIFIED finding names the
// dispatch (or the thread) it is about; diagnose then reports everything
// known of that dispatch's thread: what the harness sent and was answered,
// the agent's journal, the store's records as the store holds them after
// the sidecar stopped (every dispatch of the thread, its runs, the thread
// projection and message log), the sidecar kill and start times and, on
// the NATS store, every version of the thread's records the history
// history stream kept (startNATSHistory). MAILBOX_CRASH_KEEP names a directory that
// receives the diagnosis and the child logs and journals of a failed test.

// historySuffix names the stream that sources a NATS store's stream and
// keeps every version of every record (the store keeps one per subject):
// memory storage, so it costs the server no fsync. It sources rather than
// mirrors: a mirror of a stream that allows direct gets inherits
// MirrorDirect (nats-server forces it) and answers the store's direct gets
// itself, from behind — a read right after a write then missed it (a run
// not found by the attempt its own commit started, dead-lettered).
const historySuffix = "_HIST"

// startNATSHistory creates the store's stream (as the sidecar would) and a
// stream sourcing it that keeps every message, before the first sidecar
// starts.
func startNATSHistory(n natsTarget) error {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg, err := natsstore.StreamConfig(natsstore.Config{URL: n.url, Stream: n.stream, Prefix: n.prefix})
	if err != nil {
		return err
	}
	nc, err := nats.Connect(n.url)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("create the store's stream: %w", err)
	}
	_, err = js.CreateStream(ctx, jetstream.StreamConfig{
		Name:              n.stream + historySuffix,
		Sources:           []*jetstream.StreamSource{{Name: n.stream}},
		Storage:           jetstream.MemoryStorage,
		MaxMsgsPerSubject: -1,
		MaxMsgs:           -1,
		MaxBytes:          -1,
	})
	if err != nil {
		return fmt.Errorf("create the history stream: %w", err)
	}
	return nil
}

// natsHistory returns every version the history stream kept of the given subjects,
// one line each, in stream order.
func natsHistory(n natsTarget, subjects []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	nc, err := nats.Connect(n.url)
	if err != nil {
		return "", err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return "", err
	}
	st, err := js.Stream(ctx, n.stream+historySuffix)
	if err != nil {
		return "", err
	}
	cons, err := st.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{FilterSubjects: subjects})
	if err != nil {
		return "", err
	}
	info, err := st.Info(ctx)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "(history stream: %d messages, last seq %d)\n", info.State.Msgs, info.State.LastSeq)
	for {
		msg, err := cons.Next(jetstream.FetchMaxWait(time.Second))
		if err != nil {
			break // no more
		}
		md, _ := msg.Metadata()
		var seq uint64
		var at time.Time
		if md != nil {
			seq, at = md.Sequence.Stream, md.Timestamp
		}
		body := string(msg.Data())
		if msg.Headers().Get("Mbx-Op") == "DEL" {
			body = "<deleted>"
		}
		fmt.Fprintf(&b, "  seq %d %s %s %s\n", seq, at.Format("15:04:05.000000"), subjectName(n.prefix, msg.Subject()), body)
	}
	return b.String(), nil
}

// subjectName makes a store subject readable: the hex segments decoded.
func subjectName(prefix, subj string) string {
	toks := strings.Split(strings.TrimPrefix(subj, prefix+"."), ".")
	for i, t := range toks {
		if len(t) > 1 && t[0] == 'h' {
			if raw, err := hexDecode(t[1:]); err == nil {
				toks[i] = raw
			}
		}
	}
	return strings.Join(toks, ".")
}

func hexDecode(s string) (string, error) {
	b := make([]byte, len(s)/2)
	for i := 0; i+1 < len(s); i += 2 {
		var v byte
		for _, c := range s[i : i+2] {
			v <<= 4
			switch {
			case c >= '0' && c <= '9':
				v |= byte(c - '0')
			case c >= 'a' && c <= 'f':
				v |= byte(c-'a') + 10
			default:
				return "", fmt.Errorf("not hex")
			}
		}
		b[i/2] = v
	}
	return string(b), nil
}

func seg(s string) string { return "h" + fmt.Sprintf("%x", s) }

// openClusterStore opens the store the cluster's sidecars used (its
// processes stopped).
func openClusterStore(ctx context.Context, c *cluster) (engine.Store, error) {
	if c.nats.url != "" {
		s, err := natsstore.Open(ctx, natsstore.Config{URL: c.nats.url, Stream: c.nats.stream, Prefix: c.nats.prefix})
		if err != nil {
			return nil, fmt.Errorf("open the NATS store: %w", err)
		}
		return s, nil
	}
	s, err := badgerstore.Open(badgerstore.Options{Dir: c.data})
	if err != nil {
		return nil, fmt.Errorf("open the data directory: %w", err)
	}
	return s, nil
}

// diagnose reports what is known of the suspect dispatches' threads (and
// of the suspect threads). Call it once the processes stopped; cs are the
// sidecars sharing the store.
func diagnose(cs []*cluster, rec *recorder, snap *snapshot, entries []journalEntry, suspects, suspectThreads []string) string {
	c := cs[0]
	var b strings.Builder
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := openClusterStore(ctx, c)
	if err != nil {
		fmt.Fprintf(&b, "%v\n", err)
	} else {
		defer s.Close()
	}
	jsonOf := func(v any) string {
		out, err := json.Marshal(v)
		if err != nil {
			return fmt.Sprintf("<%v>", err)
		}
		return string(out)
	}
	threads := map[string]bool{}
	for _, th := range suspectThreads {
		threads[th] = true
	}
	rec.mu.Lock()
	for _, id := range suspects {
		fmt.Fprintf(&b, "suspect dispatch %s", id)
		if a := rec.accepted[id]; a != nil {
			threads[a.Thread] = true
			fmt.Fprintf(&b, ": accepted %s on %s run %s (%q), sent %s, answered %s", a.Kind, a.Thread, a.RunID, a.Cmd, ts(a.SentNs), ts(a.AcceptedNs))
		} else if d, ok := snap.dispatches[id]; ok {
			threads[d.ThreadID] = true
		}
		fmt.Fprintf(&b, "\n  through the API at the end: %s\n", jsonOf(snap.dispatches[id]))
	}
	rec.mu.Unlock()
	for _, c := range cs {
		c.mu.Lock()
		var kills, starts []string
		for _, k := range c.sidecarKillNs {
			kills = append(kills, ts(k))
		}
		for _, p := range c.sidecars {
			starts = append(starts, p.started.Format("15:04:05.000000"))
		}
		c.mu.Unlock()
		fmt.Fprintf(&b, "sidecar %q kills: %v\nsidecar %q starts: %v\n", c.node, kills, c.node, starts)
	}

	var ths []string
	for th := range threads {
		ths = append(ths, th)
	}
	sort.Strings(ths)
	for _, th := range ths {
		fmt.Fprintf(&b, "\n===== thread %s =====\n", th)
		rec.mu.Lock()
		fmt.Fprintf(&b, "-- accepted by the API:\n")
		for _, a := range rec.byThread[th] {
			fmt.Fprintf(&b, "  %s %s run %s %q sent %s answered %s\n", a.ID, a.Kind, a.RunID, a.Cmd, ts(a.SentNs), ts(a.AcceptedNs))
		}
		fmt.Fprintf(&b, "-- interrupts, foreground submits, cancels sent:\n")
		for _, t := range rec.tries {
			if t.Thread == th {
				fmt.Fprintf(&b, "  %s %s sent %s answered %s\n", t.Kind, t.Dispatch, ts(t.SentNs), ts(t.EndNs))
			}
		}
		for _, i := range rec.interrupts {
			if i.Thread == th {
				fmt.Fprintf(&b, "  interrupt rec: sent %s returned %s own %s active %s (%s)\n", ts(i.SentNs), ts(i.ReturnedNs), i.Own, i.Active, i.ActiveInstance)
			}
		}
		for _, cr := range rec.cancels {
			if cr.Thread == th {
				fmt.Fprintf(&b, "  cancel rec: %s sent %s returned %s cancelled %v\n", cr.Dispatch, ts(cr.SentNs), ts(cr.ReturnedNs), cr.Cancelled)
			}
		}
		fmt.Fprintf(&b, "-- requests with messages:\n")
		for _, r := range rec.requests {
			if r.Thread == th {
				fmt.Fprintf(&b, "  %q sent %s answered %s\n", r.Texts, ts(r.SentNs), ts(r.AnsweredNs))
			}
		}
		rec.mu.Unlock()
		fmt.Fprintf(&b, "-- agent journal:\n")
		var js []journalEntry
		for _, e := range entries {
			if e.ThreadID == th {
				js = append(js, e)
			}
		}
		at := func(e journalEntry) int64 {
			return max(e.StartNs, e.EndNs, e.AckNs, e.AtNs)
		}
		sort.SliceStable(js, func(i, j int) bool { return at(js[i]) < at(js[j]) })
		for _, e := range js {
			fmt.Fprintf(&b, "  %s %s %s\n", ts(at(e)), e.agent.node, jsonOf(e.Record))
		}
		fmt.Fprintf(&b, "-- log through the API at the end:\n")
		for _, m := range snap.logs[th] {
			fmt.Fprintf(&b, "  seq %d %s by run %s: %.120s\n", m.Seq, m.Message.Role, m.ProducedByRunID, m.Message.Content)
		}
		if s == nil {
			continue
		}
		fmt.Fprintf(&b, "-- store, after the sidecar stopped:\n")
		runs := map[string]bool{}
		ids := map[string]bool{}
		ds, err := s.ListDispatches(ctx, th, nil, 0, 0)
		if err != nil {
			fmt.Fprintf(&b, "  list dispatches: %v\n", err)
		}
		for _, d := range ds {
			ids[d.DispatchID] = true
		}
		for _, d := range snap.dispatches {
			if d.ThreadID == th {
				ids[d.DispatchID] = true
			}
		}
		rec.mu.Lock()
		for _, a := range rec.byThread[th] {
			ids[a.ID] = true
		}
		rec.mu.Unlock()
		dispatchIDs := slices.Sorted(maps.Keys(ids))
		for _, id := range dispatchIDs {
			d, err := s.LoadDispatch(ctx, id)
			if d != nil {
				runs[d.RunID] = true
			}
			fmt.Fprintf(&b, "  dispatch %s %s %v\n", id, jsonOf(d), errText(err))
		}
		for _, d := range snap.dispatches {
			if d.ThreadID == th {
				runs[d.RunID] = true
			}
		}
		runIDs := slices.Sorted(maps.Keys(runs))
		for _, id := range runIDs {
			r, err := s.LoadRun(ctx, id)
			fmt.Fprintf(&b, "  run %s %v\n", jsonOf(r), errText(err))
		}
		tp, err := s.LoadThread(ctx, th)
		fmt.Fprintf(&b, "  thread %s %v\n", jsonOf(tp), errText(err))
		ep, err := s.CurrentEpoch(ctx, th)
		fmt.Fprintf(&b, "  epoch %d %v\n", ep, errText(err))
		if c.nats.url != "" {
			subs := []string{
				c.nats.prefix + ".e." + seg(th),
				c.nats.prefix + ".t." + seg(th),
				c.nats.prefix + ".k." + seg(th) + ".>",
			}
			for _, id := range dispatchIDs {
				subs = append(subs, c.nats.prefix+".d."+seg(id))
			}
			for _, id := range runIDs {
				subs = append(subs, c.nats.prefix+".r."+seg(id))
			}
			h, err := natsHistory(c.nats, subs)
			fmt.Fprintf(&b, "-- every version of the thread's records (history stream) %v:\n%s", errText(err), h)
		}
	}
	return b.String()
}

func errText(err error) string {
	if err == nil {
		return ""
	}
	return "(" + err.Error() + ")"
}

// keepFailure copies the diagnosis and the child logs and journals of a
// failed test to MAILBOX_CRASH_KEEP/<test>-<time>/.
func keepFailure(c *cluster, diag string) {
	root := os.Getenv("MAILBOX_CRASH_KEEP")
	if root == "" {
		return
	}
	dir := filepath.Join(root, fmt.Sprintf("%s-%s", strings.ReplaceAll(c.t.Name(), "/", "_"), time.Now().Format("150405")), c.node)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		c.t.Logf("keep: %v", err)
		return
	}
	_ = os.WriteFile(filepath.Join(dir, "diagnosis.txt"), []byte(diag), 0o644)
	files, _ := filepath.Glob(filepath.Join(c.dir, "*"))
	for _, f := range files {
		if fi, err := os.Stat(f); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		if data, err := os.ReadFile(f); err == nil {
			_ = os.WriteFile(filepath.Join(dir, filepath.Base(f)), data, 0o644)
		}
	}
	c.t.Logf("kept the diagnosis, logs and journals in %s", dir)
}

// pendingIDs are the dispatch ids drain's pending lines name.
func pendingIDs(pending []string) []string {
	var out []string
	for _, p := range pending {
		f := strings.Fields(p)
		switch {
		case len(f) > 3 && f[0] == "accepted":
			out = append(out, f[3])
		case len(f) > 0 && f[0] != "thread":
			out = append(out, f[0])
		}
	}
	return out
}

// guardOrphans counts the foreground dispatches a kill left to their
// inline-claim guard: enqueued available InlineClaimGuard (60 s) after their
// creation for the submit's own inline claim, which the kill prevented
// (never claimed before the guard, or superseded unclaimed). They are not
// accepted (the submit never answered), and nothing claims them before the
// guard lapses unless an interrupt supersedes them first; drainTimeout is
// as long as the guard.
func guardOrphans(c *cluster, threads []string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	s, err := openClusterStore(ctx, c)
	if err != nil {
		return "", err
	}
	defer s.Close()
	guard := engine.InlineClaimGuard.Milliseconds()
	var out []string
	for _, th := range threads {
		ds, err := s.ListDispatches(ctx, th, nil, 0, 0)
		if err != nil {
			return "", err
		}
		for _, d := range ds {
			if d.AvailableAt-d.CreatedAt < guard-1000 || d.Status == engine.StatusCancelled {
				continue // not guarded, or cancelled at once: the inline claim lost the thread
			}
			// Claimed inline, its attempt started at once; an orphan's
			// run never started before the guard, if ever.
			orphan := d.Status == engine.StatusQueued
			if !orphan {
				r, err := s.LoadRun(ctx, d.RunID)
				if err != nil {
					return "", err
				}
				orphan = r != nil && (r.StartCount == 0 || r.StartedAt*1000 >= d.AvailableAt-1000)
			}
			if orphan {
				out = append(out, fmt.Sprintf("%s on %s %s created %s available %s updated %s (%s)", d.DispatchID, th, d.Status,
					time.UnixMilli(d.CreatedAt).Format("15:04:05.000"), time.UnixMilli(d.AvailableAt).Format("15:04:05.000"),
					time.UnixMilli(d.UpdatedAt).Format("15:04:05.000"), d.LastError))
			}
		}
	}
	return strings.Join(out, "\n"), nil
}
