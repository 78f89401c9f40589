package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go"

	"github.com/mailbox-sidecar/mailbox-sidecar/badgerstore"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore"
)

// Store selection. --store is empty or "badger" (the default: Badger in
// --data-dir) or a NATS server URL list "nats://host:port[,nats://…]"
// (tls:// for TLS): natsstore on JetStream, shared by every sidecar that
// names the same servers, stream and prefix. With NATS, --data-dir and
// --sync are not used (durability is the server's: see README.md).

// Defaults of the NATS store flags (natsstore's own defaults).
const (
	defaultNATSStream   = "MAILBOX"
	defaultNATSPrefix   = "mbx"
	defaultNATSReplicas = 1
)

// natsOpenTimeout bounds connecting to NATS and building the index at
// start.
const natsOpenTimeout = 30 * time.Second

// sidecarStore is what serve needs of a store: the engine's interface,
// a writability probe for /readyz, and Close.
type sidecarStore interface {
	engine.Store
	Writable() error
	Close() error
}

// storeFlags declares the store selection and NATS flags on fs.
func storeFlags(fs *flag.FlagSet, c *serveConfig) {
	fs.StringVar(&c.Store, "store", "", "store: empty or badger (Badger in --data-dir), or NATS servers nats://host:port[,nats://…] (JetStream, shared by several sidecars)")
	fs.StringVar(&c.NATSCreds, "nats-creds", "", "NATS credentials file (JWT + NKey seed); NATS only")
	fs.StringVar(&c.NATSUser, "nats-user", "", "NATS user (with --nats-password); NATS only")
	fs.StringVar(&c.NATSPassword, "nats-password", "", "NATS password (prefer its environment variable); NATS only")
	fs.StringVar(&c.NATSToken, "nats-token", "", "NATS authentication token (prefer its environment variable); NATS only")
	fs.StringVar(&c.NATSStream, "nats-stream", defaultNATSStream, "JetStream stream of the records (the signals use <stream>_SIGNALS); NATS only")
	fs.StringVar(&c.NATSPrefix, "nats-prefix", defaultNATSPrefix, "first subject token of the records (<prefix>.>, <prefix>sig.>, <prefix>live.>); NATS only")
	fs.IntVar(&c.NATSReplicas, "nats-replicas", defaultNATSReplicas, "stream replicas (1, or 3 on a cluster); NATS only")
	fs.StringVar(&c.ConsumerID, "consumer-id", "", "this sidecar's name in claims (claimed_by); default <hostname>-<pid>-<random>")
}

// usesNATS reports whether --store selects the NATS store.
func (c *serveConfig) usesNATS() bool {
	s := strings.TrimSpace(c.Store)
	return s != "" && s != "badger"
}

// validateStore checks the store flags (nothing is opened: a credentials
// file is only looked at).
func (c *serveConfig) validateStore() []error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	natsSet := c.NATSCreds != "" || c.NATSUser != "" || c.NATSPassword != "" || c.NATSToken != "" ||
		c.NATSStream != defaultNATSStream || c.NATSPrefix != defaultNATSPrefix || c.NATSReplicas != defaultNATSReplicas
	if !c.usesNATS() {
		if strings.TrimSpace(c.DataDir) == "" {
			bad("--data-dir must not be empty")
		}
		if natsSet {
			bad("--nats-* flags need --store nats://host:port (the store is Badger)")
		}
		return errs
	}
	for _, u := range strings.Split(c.Store, ",") {
		if err := checkNATSURL(strings.TrimSpace(u)); err != nil {
			errs = append(errs, err)
		}
	}
	auth := 0
	for _, set := range []bool{c.NATSCreds != "", c.NATSToken != "", c.NATSUser != "" || c.NATSPassword != ""} {
		if set {
			auth++
		}
	}
	if auth > 1 {
		bad("--nats-creds, --nats-token and --nats-user/--nats-password exclude each other; choose one")
	}
	if (c.NATSUser == "") != (c.NATSPassword == "") {
		bad("--nats-user and --nats-password go together")
	}
	if c.NATSCreds != "" {
		if fi, err := os.Stat(c.NATSCreds); err != nil {
			bad("--nats-creds: %v", err)
		} else if !fi.Mode().IsRegular() {
			bad("--nats-creds %s is not a regular file", c.NATSCreds)
		}
	}
	if c.NATSReplicas < 1 || c.NATSReplicas > 5 {
		bad("--nats-replicas %d must be between 1 and 5", c.NATSReplicas)
	}
	if _, err := natsstore.StreamConfig(c.natsConfig(nil)); err != nil {
		bad("%s", strings.TrimPrefix(strings.TrimPrefix(err.Error(), "validation: "), "natsstore: "))
	}
	return errs
}

// checkNATSURL accepts nats://host:port and tls://host:port (user
// information allowed).
func checkNATSURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		// Not err itself: url.Parse's error quotes the whole URL, with its
		// password (found by review: a password with a raw '%' or a space
		// reached the output).
		return fmt.Errorf("--store %q: not a URL (escape '%%', spaces and other reserved characters in its user and password)", redactURL(s))
	}
	if u.Scheme != "nats" && u.Scheme != "tls" {
		return fmt.Errorf("--store %q: want badger or nats://host:port (or tls://host:port)", redactURL(s))
	}
	if u.Hostname() == "" {
		return fmt.Errorf("--store %q: no host", redactURL(s))
	}
	return nil
}

// redactURL hides the credentials of every URL in a comma-separated list
// (natsstore.RedactURL).
func redactURL(list string) string { return natsstore.RedactURL(list) }

// natsConfig is the NATS store's configuration.
func (c *serveConfig) natsConfig(log *slog.Logger) natsstore.Config {
	opts := []nats.Option{nats.Name("mailbox-sidecar " + c.ConsumerID)}
	switch {
	case c.NATSCreds != "":
		opts = append(opts, nats.UserCredentials(c.NATSCreds))
	case c.NATSToken != "":
		opts = append(opts, nats.Token(c.NATSToken))
	case c.NATSUser != "":
		opts = append(opts, nats.UserInfo(c.NATSUser, c.NATSPassword))
	}
	return natsstore.Config{
		URL: c.Store, Stream: c.NATSStream, Prefix: c.NATSPrefix, Replicas: c.NATSReplicas,
		// A live command's sender waits longer than the receiving
		// sidecar waits for its agent's receipt.
		LiveTimeout: c.CommandTimeout + 3*time.Second,
		Options:     opts, Logger: log,
	}
}

// defaultConsumerID names this process in claims: host, pid and a random
// suffix, so a restarted process (pid 1 again in a container) is told
// apart from its predecessor.
func defaultConsumerID() string {
	host, err := os.Hostname()
	if err != nil || host == "" {
		host = "sidecar"
	}
	return fmt.Sprintf("%s-%d-%s", host, os.Getpid(), uuid.NewString()[:8])
}

// openStore opens the configured store.
func openStore(cfg serveConfig, log *slog.Logger) (sidecarStore, error) {
	if cfg.usesNATS() {
		ctx, cancel := context.WithTimeout(context.Background(), natsOpenTimeout)
		defer cancel()
		s, err := natsstore.Open(ctx, cfg.natsConfig(log))
		if err != nil {
			return nil, fmt.Errorf("open NATS store %s (stream %s): %w", redactURL(cfg.Store), cfg.NATSStream, err)
		}
		// Before anything is claimed: a second sidecar with this
		// consumer id would take the first's claims for its own.
		host, _ := os.Hostname()
		if err := s.TakeName(ctx, cfg.ConsumerID, fmt.Sprintf("pid %d on %s", os.Getpid(), host)); err != nil {
			_ = s.Close()
			if errors.Is(err, natsstore.ErrNameInUse) {
				return nil, fmt.Errorf("--consumer-id %q is in use by a running sidecar on this queue; give each sidecar its own, or leave it unset: %w", cfg.ConsumerID, err)
			}
			return nil, fmt.Errorf("open NATS store %s (stream %s): %w", redactURL(cfg.Store), cfg.NATSStream, err)
		}
		return s, nil
	}
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return nil, fmt.Errorf("data directory: %w", err)
	}
	s, err := badgerstore.Open(badgerstore.Options{Dir: cfg.DataDir, NoSync: !cfg.Sync, Logger: log})
	if err != nil {
		if errors.Is(err, engine.ErrDataDirInUse) {
			return nil, fmt.Errorf("data directory %s is in use by another sidecar (or another process holds its lock): %w", cfg.DataDir, err)
		}
		if errors.Is(err, badgerstore.ErrFormatTooNew) {
			return nil, fmt.Errorf("data directory %s was written by a later version of mailbox-sidecar; run that version, or start on a fresh directory: %w", cfg.DataDir, err)
		}
		return nil, fmt.Errorf("open store in %s: %w", cfg.DataDir, err)
	}
	return s, nil
}

// serveLive routes the live commands other sidecars send to runs
// executing here into the engine (NATS only; Badger runs everything in
// one process).
func serveLive(store sidecarStore, mb *engine.Mailbox) error {
	ns, ok := store.(*natsstore.Store)
	if !ok {
		return nil
	}
	if err := ns.ServeLiveAnswers(mb.AnswerLive); err != nil {
		return fmt.Errorf("live commands: %w", err)
	}
	return nil
}

// storeDescription is the store for the startup log line (no secrets).
func (c *serveConfig) storeDescription() []any {
	if c.usesNATS() {
		return []any{"store", "nats", "nats_servers", redactURL(c.Store), "nats_stream", c.NATSStream,
			"nats_prefix", c.NATSPrefix, "nats_replicas", c.NATSReplicas, "consumer_id", c.ConsumerID}
	}
	return []any{"store", "badger", "data_dir", c.DataDir, "sync", c.Sync, "consumer_id", c.ConsumerID}
}
