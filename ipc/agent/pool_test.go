package agent

import (
	"sync/atomic"
	"testing"
	"time"
)

// Runs one after another reuse the pool's goroutine instead of starting
// one each; concurrent runs get goroutines of their own; stop waits for
// the running ones and ends the idle ones.
func TestRunPoolReusesGoroutines(t *testing.T) {
	p := newRunPool()
	done := make(chan struct{})
	for range 200 {
		p.do(func() { done <- struct{}{} })
		<-done
	}
	// Between a run's end and the next do the goroutine may not be back
	// in its select yet (then a second one starts), but far from 200.
	if made := p.made.Load(); made > 20 {
		t.Fatalf("%d goroutines for 200 runs one after another; want them reused", made)
	}
	release := make(chan struct{})
	var running atomic.Int32
	for range 5 {
		p.do(func() { running.Add(1); <-release })
	}
	deadline := time.Now().Add(5 * time.Second)
	for running.Load() < 5 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d of 5 concurrent runs started", running.Load())
		}
		time.Sleep(time.Millisecond)
	}
	stopped := make(chan struct{})
	go func() { p.stop(); close(stopped) }()
	select {
	case <-stopped:
		t.Fatal("stop returned while runs were still running")
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	<-stopped // goleak (TestMain) checks that no goroutine is left
}
