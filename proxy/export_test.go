package proxy

import (
	"fmt"
	"time"

	"github.com/valyala/fasthttp"
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

// ServeRequest runs ctx through the API listener's body budget and
// handler, as fasthttp does a request whose body it has read.
func (s *Server) ServeRequest(ctx *fasthttp.RequestCtx) {
	if !s.Admit(&ctx.Request.Header) {
		panic("ServeRequest: no room")
	}
	s.handle(ctx, kindAPI)
}

// ReadError runs the API listener's read-error hook on ctx.
func (s *Server) ReadError(ctx *fasthttp.RequestCtx, err error) { s.readError(ctx, err, kindAPI) }

// Admit charges the budget for a request of header h, as HeaderReceived.
func (s *Server) Admit(h *fasthttp.RequestHeader) bool {
	return s.body.admit(h, charge(h, s.cfg.MaxBody), func() int { return headerRoute(h) })
}

// SetAnswerReadRate sets the slowest average rate, in bytes a second, at
// which a client may read an answer before its connection is cut.
func (s *Server) SetAnswerReadRate(n int64) { s.answerRate = n }
