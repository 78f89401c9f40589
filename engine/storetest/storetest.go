// Package storetest is the conformance suite every engine.Store
// implementation runs: storetest.Run(t, open). Each case gets a fresh store
// from open and checks one numbered rule of store.md (§2 dispatch queue,
// §3 run store) or one upstream conformance case (conformance.md), by the
// rule number or case id in its name.
package storetest

import (
	"testing"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// Open returns a fresh, empty store for one test; the store must be closed
// by a t.Cleanup registered by Open.
type Open func(t *testing.T) engine.Store

// Case is one conformance test.
type Case struct {
	Name string
	Run  func(t *testing.T, s engine.Store)
}

// Cases returns every conformance case.
func Cases() []Case {
	var all []Case
	all = append(all, dispatchCases()...)
	all = append(all, runCases()...)
	return all
}

// OptionalCases returns the cases of the optional capabilities a store
// implements (engine.CompleteClaimer, engine.StartClaimer,
// engine.IdleSubmitter).
func OptionalCases(s engine.Store) []Case {
	var all []Case
	if _, ok := s.(engine.CompleteClaimer); ok {
		all = append(all, completeClaimCases()...)
	}
	if _, ok := s.(engine.StartClaimer); ok {
		all = append(all, claimStartCases()...)
	}
	if _, ok := s.(engine.IdleSubmitter); ok {
		all = append(all, submitIdleCases()...)
	}
	return all
}

// Run runs every conformance case, and those of the optional capabilities
// the store implements, against stores from open, in parallel.
func Run(t *testing.T, open Open) {
	t.Helper()
	probe := open(t)
	for _, c := range append(Cases(), OptionalCases(probe)...) {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			c.Run(t, open(t))
		})
	}
}
