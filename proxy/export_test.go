package proxy

import (
	"fmt"
	"time"
)

// Decoders exported to the external tests (fuzzing).
var (
	DecodeSubmit   = decodeSubmit
	DecodeMessages = decodeMessages
	DecodeDecision = decodeDecision
	ValidPathID    = validPathID[string]
)

// Lingering is the size of the set of lingering connections; it checks
// that the set and its counter agree.
func (s *Server) Lingering() (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := int(s.nLingering.Load()); n != len(s.lingering) {
		return 0, fmt.Errorf("lingering: %d connections, counter %d", len(s.lingering), n)
	}
	return len(s.lingering), nil
}

// SetBodyHoldStale shortens how long a body admitted by the budget may
// stay unclaimed before its bytes are given back.
func (s *Server) SetBodyHoldStale(d time.Duration) {
	s.body.mu.Lock()
	s.body.stale = d
	s.body.mu.Unlock()
}
