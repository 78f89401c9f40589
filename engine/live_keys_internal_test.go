package engine

import (
	"strconv"
	"testing"
)

// An attempt remembers the newest maxLiveKeys dedupe keys of the
// messages it took live, whatever a client sends it: the oldest are
// forgotten first, and a key seen again is not counted twice.
func TestAnAttemptRemembersTheNewestLiveKeys(t *testing.T) {
	var e execution
	const extra = 10
	for i := range maxLiveKeys + extra {
		e.rememberLiveKey("k" + strconv.Itoa(i))
		e.rememberLiveKey("k" + strconv.Itoa(i)) // a repeat: no room taken
	}
	if len(e.liveKeys) != maxLiveKeys || len(e.liveKeyRing) != maxLiveKeys {
		t.Fatalf("%d keys, ring of %d; want %d", len(e.liveKeys), len(e.liveKeyRing), maxLiveKeys)
	}
	for i := range maxLiveKeys + extra {
		_, kept := e.liveKeys["k"+strconv.Itoa(i)]
		if want := i >= extra; kept != want {
			t.Fatalf("key %d kept %v, want %v", i, kept, want)
		}
	}
}
