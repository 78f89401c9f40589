package loglimit

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func TestEverySecond(t *testing.T) {
	var e EverySecond
	t0 := time.Unix(1000, 0)
	if n, ok := e.Allow(t0); !ok || n != 0 {
		t.Fatalf("first line: %d %v", n, ok)
	}
	for i := range 5 {
		if _, ok := e.Allow(t0.Add(time.Duration(i+1) * 100 * time.Millisecond)); ok {
			t.Fatalf("line %d within the second let through", i)
		}
	}
	if n, ok := e.Allow(t0.Add(time.Second)); !ok || n != 5 {
		t.Fatalf("a second on: %d %v; want the line, and 5 held back", n, ok)
	}
}

func TestClip(t *testing.T) {
	if got := Clip("short", 10); got != "short" {
		t.Fatalf("Clip(short) = %q", got)
	}
	long := strings.Repeat("é", 100) // 200 bytes
	got := Clip(long, 51)
	if !utf8.ValidString(got) || !strings.HasSuffix(got, "…(200 bytes)") || len(got) > 51+len("…(200 bytes)") {
		t.Fatalf("Clip = %q", got)
	}
	if got := Clip(strings.Repeat("x", 1000), 0); got != "…(1000 bytes)" {
		t.Fatalf("Clip to 0 = %q", got)
	}
}
