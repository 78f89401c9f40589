package proxy

import (
	"testing"
	"time"
)

// One warning a second gets through, with the count held back before it.
func TestEverySecondLetsOneLineThroughASecond(t *testing.T) {
	var e everySecond
	t0 := time.Unix(1000, 0)
	if n, ok := e.allow(t0); !ok || n != 0 {
		t.Fatalf("first: %d %v", n, ok)
	}
	for i := range 5 {
		if _, ok := e.allow(t0.Add(time.Duration(i) * 100 * time.Millisecond)); ok {
			t.Fatalf("line %d within the second got through", i)
		}
	}
	if n, ok := e.allow(t0.Add(time.Second)); !ok || n != 5 {
		t.Fatalf("after the second: %d %v, want 5 held back", n, ok)
	}
}
