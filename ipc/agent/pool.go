package agent

import (
	"sync"
	"sync/atomic"
	"time"
)

// idleWorker is how long a handler goroutine waits for the next run before
// it exits.
const idleWorker = 10 * time.Second

// runPool runs handlers on goroutines kept between runs. A goroutine that
// has run a handler has grown its stack (encoding events to JSON needs a
// deep one); a fresh goroutine per run paid for that growth every time,
// about 15 % of the echo agent's CPU. An idle goroutine waits for the next
// run for idleWorker, or until stop.
type runPool struct {
	jobs chan func()   // unbuffered: a send succeeds only to a waiting goroutine
	quit chan struct{} // closed by stop
	wg   sync.WaitGroup
	made atomic.Int64 // goroutines started (tests)
}

func newRunPool() *runPool {
	return &runPool{jobs: make(chan func()), quit: make(chan struct{})}
}

// do runs f on an idle goroutine of the pool, or on a new one.
func (p *runPool) do(f func()) {
	select {
	case p.jobs <- f:
		return
	default:
	}
	p.wg.Add(1)
	p.made.Add(1)
	go p.work(f)
}

func (p *runPool) work(f func()) {
	defer p.wg.Done()
	idle := time.NewTimer(idleWorker)
	defer idle.Stop()
	for {
		f()
		idle.Reset(idleWorker)
		select {
		case f = <-p.jobs:
		case <-idle.C:
			return
		case <-p.quit:
			return
		}
	}
}

// abandon ends the idle goroutines without waiting for the busy ones (a
// handler that will not return); do must not be called after it.
func (p *runPool) abandon() { close(p.quit) }

// stop ends the idle goroutines and waits for every goroutine of the pool
// to finish its run and exit; do must not be called after it.
func (p *runPool) stop() {
	close(p.quit)
	p.wg.Wait()
}
