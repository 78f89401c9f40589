package engine

import "testing"

// A clear judged by a look that began before a submit's mark leaves the
// mark set; a look that began after it may clear it; the dispatcher's
// own set and clear keep the count of marks.
func TestStarvedMarkSurvivesAnOlderLook(t *testing.T) {
	var s starvedMark
	if s.Load() {
		t.Fatal("set at first")
	}
	gen := s.generation() // a dispatcher's look begins
	s.mark()              // a submit finds no slot meanwhile
	s.setTo(false, gen)   // the look found nothing waiting
	if !s.Load() {
		t.Fatal("a look that began before the mark cleared it")
	}
	s.clear(gen)
	if !s.Load() {
		t.Fatal("clear with an older generation cleared the mark")
	}
	gen = s.generation() // the look the mark's kick caused
	s.setTo(false, gen)
	if s.Load() {
		t.Fatal("a look that began after the mark did not clear it")
	}
	s.setTo(true, gen)
	if !s.Load() || s.generation() != gen {
		t.Fatalf("set: %v, generation %d, want true, %d", s.Load(), s.generation(), gen)
	}
	s.mark() // a mark while set counts too
	if !s.Load() || s.generation() != gen+1 {
		t.Fatalf("mark while set: %v, generation %d, want true, %d", s.Load(), s.generation(), gen+1)
	}
	s.clear(gen)
	if !s.Load() {
		t.Fatal("a mark while set was lost to an older look's clear")
	}
	s.clearAlways()
	if s.Load() || s.generation() != gen+1 {
		t.Fatalf("clearAlways: %v, generation %d", s.Load(), s.generation())
	}
}
