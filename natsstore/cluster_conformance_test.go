//go:build natscluster

package natsstore_test

import (
	"sync/atomic"
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
	"github.com/mailbox-sidecar/mailbox-sidecar/engine/storetest"
	"github.com/mailbox-sidecar/mailbox-sidecar/natsstore/natstest"
)

// The conformance suite on R3 streams of a 3-node cluster, the stores
// connected to the nodes in turn (reads go to the stream leader, writes
// are acknowledged by a quorum). It creates three RAFT groups per test
// (~30 s without the race detector on two cores), so it is not part of
// make test:
//
//	go test -tags natscluster -run TestClusterConformance ./natsstore/
func TestClusterConformance(t *testing.T) {
	t.Parallel()
	c := natstest.StartCluster(t, 3)
	var n atomic.Int64
	storetest.Run(t, func(t *testing.T) engine.Store {
		cfg := freshConfig()
		cfg.Replicas = 3
		cfg.URL = c.Servers[int(n.Add(1))%3].URL()
		return openCfg(t, cfg)
	})
}
