package natsstore

import (
	"errors"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// The client's own refusal of a message over max_payload (a backstop of
// publish's size check) is too large; its other failures are unavailable.
func TestTransportErrorsAreClassified(t *testing.T) {
	if err := transportErr(nats.ErrMaxPayload); !errors.Is(err, engine.ErrTooLarge) || errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("max payload: %v, want too large only", err)
	}
	if err := transportErr(nats.ErrConnectionClosed); !errors.Is(err, engine.ErrUnavailable) {
		t.Fatalf("closed connection: %v, want unavailable", err)
	}
	m := &nats.Msg{Subject: "s", Data: make([]byte, 10), Header: nats.Header{"A": {"bc"}}}
	if n := msgSize(m); n != int64(len("NATS/1.0\r\nA: bc\r\n\r\n")+10) {
		t.Fatalf("msgSize = %d", n)
	}
}
