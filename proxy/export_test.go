package proxy

// Decoders exported to the external tests (fuzzing).
var (
	DecodeSubmit   = decodeSubmit
	DecodeMessages = decodeMessages
	DecodeDecision = decodeDecision
	ValidPathID    = validPathID[string]
)
