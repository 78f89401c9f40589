package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseServeStoreSelection(t *testing.T) {
	// Default: Badger, a consumer id of its own.
	c, err := parseServe(nil, env(nil), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if c.usesNATS() || c.Store != "" || c.NATSStream != "MAILBOX" || c.NATSPrefix != "mbx" || c.NATSReplicas != 1 {
		t.Fatalf("store defaults: %+v", c)
	}
	host, _ := os.Hostname()
	if !strings.HasPrefix(c.ConsumerID, host+"-") || c.engineConfig(nil).ConsumerID != c.ConsumerID {
		t.Fatalf("default consumer id %q", c.ConsumerID)
	}
	if again, _ := parseServe(nil, env(nil), io.Discard); again.ConsumerID == c.ConsumerID {
		t.Fatalf("two sidecars got the same consumer id %q", c.ConsumerID)
	}
	if c, err := parseServe([]string{"--store", "badger"}, env(nil), io.Discard); err != nil || c.usesNATS() {
		t.Fatalf("--store badger: %v %v", c.usesNATS(), err)
	}

	// NATS from the environment (flags win), --data-dir not needed.
	creds := filepath.Join(t.TempDir(), "user.creds")
	if err := os.WriteFile(creds, []byte("creds"), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err = parseServe([]string{"--nats-replicas", "3", "--data-dir", "", "--consumer-id", "pod-a"}, env(map[string]string{
		"MAILBOX_SIDECAR_STORE":         "nats://n1:4222, tls://n2:4222",
		"MAILBOX_SIDECAR_NATS_CREDS":    creds,
		"MAILBOX_SIDECAR_NATS_STREAM":   "Q",
		"MAILBOX_SIDECAR_NATS_PREFIX":   "acme.q",
		"MAILBOX_SIDECAR_NATS_REPLICAS": "5",
	}), io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	nc := c.natsConfig(nil)
	if !c.usesNATS() || nc.URL != "nats://n1:4222, tls://n2:4222" || nc.Stream != "Q" || nc.Prefix != "acme.q" || nc.Replicas != 3 ||
		len(nc.Options) != 2 || c.ConsumerID != "pod-a" || c.engineConfig(nil).ConsumerID != "pod-a" {
		t.Fatalf("nats config: %+v %+v", c, nc)
	}
	if _, err := parseServe(nil, env(map[string]string{
		"MAILBOX_SIDECAR_STORE": "nats://n1:4222", "MAILBOX_SIDECAR_NATS_USER": "u", "MAILBOX_SIDECAR_NATS_PASSWORD": "p",
	}), io.Discard); err != nil {
		t.Fatalf("user and password: %v", err)
	}
	if _, err := parseServe([]string{"--store", "nats://n1:4222", "--nats-token", "s3cret"}, env(nil), io.Discard); err != nil {
		t.Fatalf("token: %v", err)
	}
}

func TestParseServeRejectsBadStoreFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--store", "postgres://db"}, "want badger or nats://"},
		{[]string{"--store", "nats://"}, "no host"},
		{[]string{"--nats-stream", "Q"}, "need --store nats://"},
		{[]string{"--nats-token", "t"}, "need --store nats://"},
		{[]string{"--data-dir", ""}, "--data-dir must not be empty"},
		{[]string{"--store", "nats://n:4222", "--nats-user", "u"}, "go together"},
		{[]string{"--store", "nats://n:4222", "--nats-token", "t", "--nats-creds", "/etc/hostname"}, "exclude each other"},
		{[]string{"--store", "nats://n:4222", "--nats-creds", "/no/such.creds"}, "--nats-creds"},
		{[]string{"--store", "nats://n:4222", "--nats-creds", "/"}, "not a regular file"},
		{[]string{"--store", "nats://n:4222", "--nats-replicas", "0"}, "between 1 and 5"},
		{[]string{"--store", "nats://n:4222", "--nats-prefix", "a.*"}, "prefix"},
		{[]string{"--store", "nats://n:4222", "--nats-stream", "a b"}, "stream name"},
	}
	for _, tc := range cases {
		if _, err := parseServe(tc.args, env(nil), io.Discard); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to mention %q", tc.args, err, tc.want)
		}
	}
}

// A --store URL that does not parse is refused without its password:
// url.Parse's error quotes the whole URL (found by review: a password
// with a raw '%' or a space reached the output).
func TestAnUnparsableStoreURLKeepsItsPassword(t *testing.T) {
	for _, u := range []string{"nats://eve:PWbad%zz@127.0.0.1:4299", "nats://frank:PW space@127.0.0.1:4299"} {
		err := checkNATSURL(u)
		if err == nil || strings.Contains(err.Error(), "PW") || !strings.Contains(err.Error(), "not a URL") {
			t.Errorf("checkNATSURL of a URL that does not parse: %v; want a refusal without the password", err)
		}
	}
}
