package hub_test

import (
	"bufio"
	"context"
	"io"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/hub"
)

// eventPayload is a typical small streaming event: 64 bytes of JSON, so
// that a frame is 80 bytes on the wire.
var eventPayload = []byte(`{"type":"text_delta","delta":"the quick brown fox jumps ovr"}   `)

func init() {
	if len(eventPayload) != 64 {
		panic(len(eventPayload))
	}
}

// countingSink counts events and signals when it has seen want of them.
type countingSink struct {
	n    atomic.Int64
	want int64
	done chan struct{}
}

func (s *countingSink) Emit(data []byte) {
	if s.n.Add(1) == s.want {
		close(s.done)
	}
}

func benchRig(b *testing.B) *rig {
	return newRig(b, hub.Config{Heartbeat: time.Minute})
}

// logSink is the engine's side of forwarding: each event copied into a
// run's EventLog (the ring clients read and re-attach from).
type logSink struct {
	log *engine.EventLog
	countingSink
}

func (s *logSink) Emit(data []byte) {
	s.log.Append(data)
	s.countingSink.Emit(data)
}

// BenchmarkEventForwarding measures EVENT frames from an agent socket to
// a run's sink: one connection, one run, 64-byte events. Compare with
// BenchmarkRawSocketMessages (same message size, same connection count).
// "hub" stops at the sink; "to_event_log" includes the engine's copy of
// every event into the run's EventLog.
func BenchmarkEventForwarding(b *testing.B) {
	b.Run("hub", func(b *testing.B) {
		benchForwarding(b, func(c *countingSink) engine.EventSink { return c })
	})
	b.Run("to_event_log", func(b *testing.B) {
		benchForwarding(b, func(c *countingSink) engine.EventSink {
			return &logSink{log: engine.NewEventLog(10000), countingSink: countingSink{want: c.want, done: c.done}}
		})
	})
}

func benchForwarding(b *testing.B, wrap func(*countingSink) engine.EventSink) {
	r := benchRig(b)
	a, _ := connect(b, r.path, ipc.Hello{MaxRuns: 1})
	eventually(b, "agent", func() bool { return r.hub.Capacity() == 1 })
	counter := &countingSink{want: int64(b.N), done: make(chan struct{})}
	sink := wrap(counter)
	out := make(chan engine.RunOutcome, 1)
	go func() { out <- r.hub.Run(context.Background(), request("bench"), sink) }()
	f := a.expect(ipc.TypeRun, 1)

	b.SetBytes(int64(ipc.HeaderSize + len(eventPayload)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := a.w.WriteFrame(ipc.TypeEvent, 0, f.Stream, eventPayload); err != nil {
			b.Fatal(err)
		}
	}
	<-counter.done
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	a.send(ipc.TypeFinish, f.Stream, finishDone(""))
	<-out
}

// BenchmarkRawSocketMessages is the baseline of BenchmarkEventForwarding:
// 80-byte messages, one write each, read through a buffered reader on
// one Unix-socket connection.
func BenchmarkRawSocketMessages(b *testing.B) {
	path := socketPath(b)
	ln, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	const size = ipc.HeaderSize + 64
	got := make(chan struct{})
	go func() {
		defer close(got)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReaderSize(c, 64<<10)
		var msg [size]byte
		for range b.N {
			if _, err := io.ReadFull(br, msg[:]); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	msg := make([]byte, size)
	b.SetBytes(size)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	<-got
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

// reportLatency adds p50 and p99 in microseconds.
func reportLatency(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "p50-µs")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "p99-µs")
}

// BenchmarkRunFinishRoundTrip measures Run from RUN sent to FINISH back
// for an empty run: hub and a frame-level agent only, no store. Compare
// with BenchmarkRawPingPong.
func BenchmarkRunFinishRoundTrip(b *testing.B) {
	r := benchRig(b)
	a, _ := connect(b, r.path, ipc.Hello{MaxRuns: 1})
	eventually(b, "agent", func() bool { return r.hub.Capacity() == 1 })
	finish := []byte(`{"status":"done"}`)
	go func() { // the agent: FINISH every RUN at once
		for {
			f, err := a.r.ReadFrame()
			if err != nil {
				return
			}
			if f.Type == ipc.TypeRun {
				if a.w.WriteFrame(ipc.TypeFinish, 0, f.Stream, finish) != nil {
					return
				}
			}
			f.Release()
		}
	}()
	req := request("bench")
	var s sink
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if o := r.hub.Run(context.Background(), req, &s); o.Kind != engine.OutcomeCompleted {
			b.Fatalf("outcome %+v", o)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportLatency(b, lat)
}

// BenchmarkRawPingPong is the baseline of BenchmarkRunFinishRoundTrip and
// BenchmarkCommandAck: a 64-byte message echoed over a Unix socket.
func BenchmarkRawPingPong(b *testing.B) {
	path := socketPath(b)
	ln, err := net.Listen("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var msg [64]byte
		for {
			if _, err := io.ReadFull(c, msg[:]); err != nil {
				return
			}
			if _, err := c.Write(msg[:]); err != nil {
				return
			}
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	var msg [64]byte
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := c.Write(msg[:]); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, msg[:]); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportLatency(b, lat)
}

// BenchmarkCommandAck measures a live command from the engine's Commands
// channel to the agent and its COMMAND_ACK back to Reply.
func BenchmarkCommandAck(b *testing.B) {
	r := benchRig(b)
	a, _ := connect(b, r.path, ipc.Hello{MaxRuns: 1})
	eventually(b, "agent", func() bool { return r.hub.Capacity() == 1 })
	cmds := make(chan engine.Command)
	req := request("bench")
	req.Commands = cmds
	out := make(chan engine.RunOutcome, 1)
	go func() { out <- r.hub.Run(context.Background(), req, &sink{}) }()
	run := a.expect(ipc.TypeRun, 1)
	go func() { // the agent: accept every command
		for {
			f, err := a.r.ReadFrame()
			if err != nil {
				return
			}
			if f.Type == ipc.TypeMessages {
				// {"cmd":"N",...}: echo the id without decoding.
				p := string(f.Payload)
				id := p[len(`{"cmd":"`):]
				id = id[:strings.IndexByte(id, '"')]
				if a.w.WriteFrame(ipc.TypeCommandAck, 0, f.Stream, []byte(`{"cmd":"`+id+`","accepted":true}`)) != nil {
					return
				}
			}
			f.Release()
		}
	}()
	reply := make(chan error, 1)
	cmd := engine.Command{Kind: engine.CommandMessages, Messages: []engine.MessageRecord{{MessageID: "m1", ThreadID: "bench", Seq: 1, Message: text("live")}}, Reply: reply}
	lat := make([]time.Duration, 0, b.N)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		cmds <- cmd
		if err := <-reply; err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	reportLatency(b, lat)
	a.w.WriteFrame(ipc.TypeFinish, 0, run.Stream, []byte(`{"status":"done"}`))
	<-out
}
