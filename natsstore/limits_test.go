package natsstore_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	json "github.com/goccy/go-json"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// limitedMaxPayload is the max_payload of the server of the oversize
// test; overPayload makes a message over it.
const limitedMaxPayload = 64 << 10

func overPayload(id string) engine.Message {
	content, _ := json.Marshal([]map[string]string{{"type": "text", "text": strings.Repeat("x", limitedMaxPayload+1)}})
	return engine.Message{ID: id, Role: "user", Content: content}
}

func shortMessage(id string) engine.Message {
	return engine.Message{ID: id, Role: "user", Content: json.RawMessage(`[{"type":"text","text":"hi"}]`)}
}

// A write with a message over the server's max_payload is too large
// (413, not a 503 to retry), fails alone when group commit merged it
// with other transactions, and sends nothing: a batch cut short stayed
// open on the server and refused every sidecar's writes for seconds
// (found by review).
func TestAMessageOverMaxPayloadIsTooLargeAndFailsAlone(t *testing.T) {
	cfg := freshConfig()
	cfg.URL = natstest.StartWithMaxPayload(t, limitedMaxPayload).URL()
	a, b := openCfg(t, cfg), openCfg(t, cfg)
	ctx := context.Background()
	if _, err := a.Checkpoint(ctx, engine.Checkpoint{ThreadID: "big", Messages: []engine.Message{overPayload("m0")}, CreatedAt: 1000}); !errors.Is(err, engine.ErrTooLarge) {
		t.Fatalf("an oversize checkpoint: %v (code %q), want too_large", err, engine.Code(err))
	}
	var stop atomic.Bool
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			th := fmt.Sprint("w", w)
			for i := 0; !stop.Load(); i++ {
				n, err := a.MessageCount(ctx, th)
				if err == nil {
					_, err = a.Checkpoint(ctx, engine.Checkpoint{ThreadID: th, ExpectedCount: n, Messages: []engine.Message{shortMessage(fmt.Sprint(th, "-", i))}, CreatedAt: 1000})
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				} else {
					ok.Add(1)
				}
			}
		})
	}
	for i := range 60 {
		// A short message first: before, it went out and left its batch
		// open on the server.
		msgs := []engine.Message{shortMessage(fmt.Sprint("s", i)), overPayload(fmt.Sprint("b", i))}
		if _, err := a.Checkpoint(ctx, engine.Checkpoint{ThreadID: "big", Messages: msgs, CreatedAt: 1000}); !errors.Is(err, engine.ErrTooLarge) {
			t.Errorf("oversize checkpoint %d: %v, want too_large", i, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if failed.Load() > 0 || ok.Load() == 0 {
		t.Fatalf("checkpoints of other threads beside the oversize ones: %d ok, %d failed (first: %v)", ok.Load(), failed.Load(), firstErr.Load())
	}
	if n, err := a.MessageCount(ctx, "big"); err != nil || n != 0 {
		t.Fatalf("the oversize thread holds %d messages (%v), want none", n, err)
	}
	start := time.Now()
	if _, err := b.Enqueue(ctx, queued("d1", "other", 1000)); err != nil {
		t.Fatalf("another sidecar's write after the oversize ones: %v (%v)", err, time.Since(start))
	}
}

// A stream that another deployment's prefix holds, or whose replica count
// differs from this store's, is refused at Open, not rewritten: the
// second deployment took the first one's subjects (its writes failed),
// and a sidecar without --nats-replicas turned three replicas into one
// (found by review).
func TestAStreamIsNotRewrittenForAnotherDeploymentsSettings(t *testing.T) {
	ctx := context.Background()
	base := freshConfig()
	a := openCfg(t, natsstore.Config{URL: base.URL, Stream: base.Stream, Prefix: "tenanta"})
	if _, err := a.Enqueue(ctx, queued("a1", "t1", 1000)); err != nil {
		t.Fatal(err)
	}
	if b, err := natsstore.Open(ctx, natsstore.Config{URL: base.URL, Stream: base.Stream, Prefix: "tenantb"}); err == nil {
		b.Close()
		t.Fatal("a store of another prefix opened on the stream")
	} else if !strings.Contains(err.Error(), "holds subjects") {
		t.Fatalf("refused with %v, want the subjects named", err)
	}
	if _, err := a.Enqueue(ctx, queued("a2", "t1", 1000)); err != nil {
		t.Fatalf("the first deployment after the refusal: %v", err)
	}

	c := natstest.StartCluster(t, 3)
	cfg3 := natsstore.Config{URL: c.Servers[0].URL(), Stream: "R3", Prefix: "r3", Replicas: 3}
	openCfg(t, cfg3)
	if b, err := natsstore.Open(ctx, natsstore.Config{URL: c.Servers[1].URL(), Stream: "R3", Prefix: "r3"}); err == nil {
		b.Close()
		t.Fatal("a store of one replica opened on a stream of three")
	} else if !strings.Contains(err.Error(), "has 3 replicas") {
		t.Fatalf("refused with %v, want the replicas named", err)
	}
	sc := openCfg(t, cfg3) // the same settings open
	js, err := jetstream.New(sc.Conn())
	if err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, "R3")
	if err != nil {
		t.Fatal(err)
	}
	if r := st.CachedInfo().Config.Replicas; r != 3 {
		t.Fatalf("stream R3 has %d replicas, want 3", r)
	}
}

// Close deletes the index's ordered consumer on the server; stopping it
// alone left it there for its inactivity threshold (5 minutes), one per
// restart (found by review). The shared signal consumer stays.
func TestCloseDeletesTheIndexConsumer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := freshConfig()
	keep := openCfg(t, cfg) // another sidecar on the stream, for the client
	js, err := jetstream.New(keep.Conn())
	if err != nil {
		t.Fatal(err)
	}
	consumers := func() []string {
		st, err := js.Stream(ctx, cfg.Stream)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		l := st.ConsumerNames(ctx)
		for n := range l.Name() {
			names = append(names, n)
		}
		if err := l.Err(); err != nil {
			t.Fatal(err)
		}
		return names
	}
	before := consumers()
	s, err := natsstore.Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := consumers(); len(got) != len(before)+1 {
		t.Fatalf("consumers %v after a second store opened, before %v", got, before)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := consumers(); len(got) != len(before) {
		t.Fatalf("consumers %v after it closed, want %d (%v)", got, len(before), before)
	}
}

// RedactURL hides a password and a token (a user part without a
// password), in every URL of a list; Open's connect error carries only
// the redacted form (found by review: a token reached the logs).
func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"nats://u:secret@a:4222,nats://b:4222": "nats://u:xxxxx@a:4222,nats://b:4222",
		"nats://secret@a:4222":                 "nats://xxxxx@a:4222",
		"tls://a:4222":                         "tls://a:4222",
		"nats://se cret@a:%zz":                 "(unparsable URL with credentials)",
	} {
		if got := natsstore.RedactURL(in); got != want {
			t.Errorf("RedactURL(%q) = %q, want %q", in, got, want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := natsstore.Open(ctx, natsstore.Config{URL: "nats://secret@127.0.0.1:1", Stream: "X", Prefix: "x"})
	if err == nil {
		s.Close()
		t.Fatal("opened a store on a closed port")
	}
	if strings.Contains(err.Error(), "secret") || !strings.Contains(err.Error(), "xxxxx") {
		t.Fatalf("open error %q", err)
	}
}
