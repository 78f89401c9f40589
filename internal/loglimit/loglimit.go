// Package loglimit keeps a log line that may come in floods to one a
// second, counting the ones it holds back.
package loglimit

import (
	"sync"
	"time"
)

// EverySecond lets one log line a second through and counts the ones it
// holds back. The zero value is ready to use; it is safe for concurrent
// use.
type EverySecond struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// Allow reports whether a line may be logged at now, and how many were
// held back since the last one.
func (e *EverySecond) Allow(now time.Time) (int, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if now.Sub(e.last) < time.Second {
		e.suppressed++
		return 0, false
	}
	n := e.suppressed
	e.last, e.suppressed = now, 0
	return n, true
}

// Clip is s cut to at most n bytes, at a rune boundary, with how long it
// was: for text a peer sends that goes into a log line (found by review:
// an agent's 1 MB ERROR messages and a 1 MB HELLO name, copied whole into
// every line about its connection, wrote 57 MB of log in 1.6 s).
func Clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && s[cut]&0xC0 == 0x80 { // a continuation byte: back to the rune's start
		cut--
	}
	return s[:cut] + "…(" + itoa(len(s)) + " bytes)"
}

func itoa(n int) string {
	var b [20]byte
	i := len(b)
	for {
		i--
		b[i] = byte('0' + n%10)
		if n /= 10; n == 0 {
			return string(b[i:])
		}
	}
}
