package proxy

import (
	"net"
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"
)

// Connections whose stall bound is past leave the lingering set as it
// grows (one that closed before it was added is never removed by the
// ConnState hook), and do not hold Shutdown back.
func TestLingeringConnectionsPastTheirBoundArePruned(t *testing.T) {
	s := &Server{lingering: map[net.Conn]time.Time{}, pruneAt: lingerPrune, answers: newAnswerBudget(1<<20, metrics.NewSet())}
	past := time.Now().Add(-time.Second)
	for range 3 * lingerPrune {
		a, b := net.Pipe()
		defer a.Close()
		defer b.Close()
		s.linger(a, past)
	}
	if n := len(s.lingering); n >= lingerPrune || int(s.nLingering.Load()) != n {
		t.Fatalf("%d connections lingering (counter %d), want fewer than %d", n, s.nLingering.Load(), lingerPrune)
	}
	if s.anyLingering(time.Now()) {
		t.Fatal("connections past their bound count as lingering")
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	s.linger(a, time.Now().Add(time.Minute))
	if !s.anyLingering(time.Now()) {
		t.Fatal("a connection within its bound does not count")
	}
	s.connState(a, fasthttp.StateActive, kindAPI) // not an end
	if !s.anyLingering(time.Now()) {
		t.Fatal("an active connection no longer lingers")
	}
	s.connState(a, fasthttp.StateIdle, kindAPI)
	if _, ok := s.lingering[a]; ok || s.anyLingering(time.Now()) {
		t.Fatal("an idle connection still lingers")
	}
}
