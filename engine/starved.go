package engine

import "sync/atomic"

// starvedMark says that threads wait for agent slots: while it is set a
// finishing attempt hands its slot to the dispatcher (oldest waiting
// thread first) rather than claim its own thread's next dispatch.
//
// The dispatcher sets and clears it from what it lists; a submit that
// finds no free slot sets it at once (mark), before the dispatcher has
// woken. A clear is conditional on no mark having come since the
// dispatcher began the look it judges by (clear): a look that listed
// before the submit's dispatch was written does not undo its mark (a
// review found that window; the kick that follows each mark repairs it
// only after a finishing attempt may have taken the slot).
type starvedMark struct {
	v atomic.Uint64 // marks made (generation) << 1 | set
}

// Load reports whether the mark is set.
func (s *starvedMark) Load() bool { return s.v.Load()&1 == 1 }

// generation is the count of marks made, read before a look that may
// clear the mark.
func (s *starvedMark) generation() uint64 { return s.v.Load() >> 1 }

// mark sets the mark and counts a new generation.
func (s *starvedMark) mark() {
	for {
		old := s.v.Load()
		if s.v.CompareAndSwap(old, (old>>1+1)<<1|1) {
			return
		}
	}
}

// set sets the mark (the dispatcher found threads waiting).
func (s *starvedMark) set() { s.v.Or(1) }

// clear clears the mark unless a mark came after generation gen.
func (s *starvedMark) clear(gen uint64) {
	for {
		old := s.v.Load()
		if old>>1 != gen || old&1 == 0 || s.v.CompareAndSwap(old, old&^1) {
			return
		}
	}
}

// clearAlways clears the mark whatever came (the mailbox is closing).
func (s *starvedMark) clearAlways() { s.v.And(^uint64(1)) }

// setTo sets the mark when starved, else clears it unless a mark came
// after generation gen.
func (s *starvedMark) setTo(starved bool, gen uint64) {
	if starved {
		s.set()
	} else {
		s.clear(gen)
	}
}
