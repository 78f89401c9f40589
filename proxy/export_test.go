package proxy

import "fmt"

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
