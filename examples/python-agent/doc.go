// Package pythonagent holds the dependency-free Python example agent
// (agent.py) and the Go test that runs it for real against a scripted fake
// sidecar. It has no Go API; the protocol agent.py speaks is described in
// docs/protocol.md.
package pythonagent
