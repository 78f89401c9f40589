// Package ipc speaks the agent protocol: the wire between the sidecar and the
// agent processes that execute runs (see spec/ipc.md).
//
// # Model
//
// An agent process connects to the sidecar's agent socket, a Unix-domain
// stream socket. One connection carries many concurrent runs. Everything on
// the connection is a frame: a fixed 16-byte header followed by a payload.
//
//	bytes 0–3   length    payload length, uint32 big-endian, at most max_frame
//	byte  4     type      FrameType (HELLO, RUN, EVENT, FINISH, …)
//	byte  5     flags     0 unless a frame type defines a bit
//	bytes 6–7   reserved  must be 0
//	bytes 8–15  stream    uint64 big-endian; 0 = the connection, else one run
//
// Streams multiplex runs: the sidecar opens a stream by sending RUN with a new
// id, the agent sends EVENT and CHECKPOINT frames on it and ends it with
// FINISH. Stream 0 carries the connection's own frames (HELLO, WELCOME,
// PING, PONG, GOAWAY, SUBMIT …).
//
// Payloads are UTF-8 JSON objects, except PING and PONG, which carry eight
// opaque bytes. A frame longer than max_frame, an unknown type, a non-zero
// reserved field or a payload that is not a JSON object where one is
// required is a protocol error: the receiver sends ERROR on stream 0 and
// closes the connection. Every such error wraps ErrProtocol.
//
// # Packages
//
// This package is the frame codec and the wire payload types: Header with
// its allocation-free Encode and DecodeHeader, a Reader that reassembles
// frames from any byte stream (frames split across reads, many frames per
// read) into pooled payload buffers, a Writer that serialises frames from
// concurrent goroutines, one write call per frame, and the JSON payloads
// both sides share (Hello, Welcome, Status, Command, CommandAck …). It
// depends on the standard library and github.com/goccy/go-json only (its
// JSON check, several times faster than encoding/json's and held to the
// same verdicts by FuzzValidAgreesWithStdlib; the SDK uses the same
// library).
//
// Package ipc/hub is the sidecar side (it implements engine.Executor);
// package ipc/agent is the SDK for agent authors. docs/protocol.md is the
// protocol document for implementers in other languages.
package ipc
