package badgerstore_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The crash child: when MAILBOX_CRASH_CHILD names a data directory, the
// test binary becomes a process that hammers the store there until it is
// killed. After each operation returns success it prints one line (one
// write(2), atomic on a pipe) saying what is now durable:
//
//	E <dispatch>            enqueued
//	A <dispatch>            acked
//	N <dispatch> <attempt>  nacked: attempt_count is now at least <attempt>
//	M <thread> <message>    message appended
//
// The parent kills it with SIGKILL at a random moment, reopens the store
// and checks every printed line.
const crashEnv = "MAILBOX_CRASH_CHILD"

func runChild() bool {
	dir := os.Getenv(crashEnv)
	if dir == "" {
		return false
	}
	cycle, _ := strconv.Atoi(os.Getenv("MAILBOX_CRASH_CYCLE"))
	if err := hammer(dir, cycle); err != nil {
		fmt.Fprintf(os.Stderr, "crash child: %v\n", err)
		os.Exit(3)
	}
	os.Exit(0)
	return true
}

func hammer(dir string, cycle int) error {
	s, err := badgerstore.Open(badgerstore.Options{Dir: dir})
	if err != nil {
		return err
	}
	ctx := context.Background()
	now := func() int64 { return time.Now().UnixMilli() }
	// A previous incarnation died holding leases: take them back.
	if _, err := s.ReclaimExpired(ctx, now()+int64(time.Hour/time.Millisecond), 1_000_000); err != nil {
		return err
	}
	var outMu sync.Mutex
	say := func(format string, args ...any) {
		line := fmt.Sprintf(format+"\n", args...)
		outMu.Lock()
		os.Stdout.WriteString(line)
		outMu.Unlock()
	}
	fmt.Fprintln(os.Stdout, "READY")
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	for w := range 8 {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(cycle), uint64(w)))
			thread := fmt.Sprintf("t%d", w%4)
			for i := 0; ; i++ {
				id := fmt.Sprintf("c%d-w%d-%d", cycle, w, i)
				d := engine.Dispatch{DispatchID: id, ThreadID: thread, RunID: "run-" + id, Priority: uint8(rng.IntN(3)), AvailableAt: now(), CreatedAt: now(), MaxAttempts: 3}
				if _, err := s.Enqueue(ctx, d); err != nil {
					errc <- err
					return
				}
				say("E %s", id)
				c, err := s.Claim(ctx, thread, fmt.Sprintf("w%d", w), time.Minute, now())
				if err != nil {
					errc <- err
					return
				}
				if c != nil {
					if rng.IntN(4) == 0 {
						n, err := s.Nack(ctx, c.DispatchID, c.ClaimToken, now(), "flaky", now())
						if err != nil {
							errc <- err
							return
						}
						say("N %s %d", c.DispatchID, n.AttemptCount)
					} else {
						if err := s.Ack(ctx, c.DispatchID, c.ClaimToken, now()); err != nil {
							errc <- err
							return
						}
						say("A %s", c.DispatchID)
					}
				}
				for {
					n, err := s.MessageCount(ctx, thread)
					if err != nil {
						errc <- err
						return
					}
					content, _ := json.Marshal("hello " + id)
					msg := engine.Message{ID: "m-" + id, Role: engine.RoleUser, Content: content}
					_, err = s.Checkpoint(ctx, engine.Checkpoint{ThreadID: thread, ExpectedCount: n, Messages: []engine.Message{msg}, CreatedAt: now()})
					if err == nil {
						say("M %s %s", thread, msg.ID)
						break
					}
					if !isConflict(err) {
						errc <- err
						return
					}
				}
			}
		})
	}
	err = <-errc
	return err
}
