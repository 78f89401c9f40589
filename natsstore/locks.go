package natsstore

import (
	"context"
	"sync"
)

// threadLocks serializes this process's operations on one thread, so they
// queue instead of refusing each other's batches. Correctness never
// depends on it (other processes do not share it); it only spares retries.
type threadLocks struct {
	mu sync.Mutex             // guards m
	m  map[string]*threadLock // thread → its lock while anyone holds or waits for it
}

type threadLock struct {
	ch   chan struct{} // holds one token while locked
	refs int           // holders and waiters; guarded by threadLocks.mu
}

func newThreadLocks() *threadLocks { return &threadLocks{m: make(map[string]*threadLock)} }

// lock takes the thread's lock, or fails when ctx ends first.
func (l *threadLocks) lock(ctx context.Context, thread string) (unlock func(), err error) {
	l.mu.Lock()
	tl := l.m[thread]
	if tl == nil {
		tl = &threadLock{ch: make(chan struct{}, 1)}
		l.m[thread] = tl
	}
	tl.refs++
	l.mu.Unlock()
	select {
	case tl.ch <- struct{}{}:
		return func() { <-tl.ch; l.release(thread, tl) }, nil
	case <-ctx.Done():
		l.release(thread, tl)
		return nil, ctx.Err()
	}
}

func (l *threadLocks) release(thread string, tl *threadLock) {
	l.mu.Lock()
	tl.refs--
	if tl.refs == 0 {
		delete(l.m, thread)
	}
	l.mu.Unlock()
}
