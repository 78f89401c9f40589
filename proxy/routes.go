package proxy

import (
	"bytes"
	"strings"

	"github.com/valyala/fasthttp"

	"github.com/mailbox-sidecar/mailbox-sidecar/engine"
)

// handler serves one method of one route; id is the route's path id
// (already validated), "" for routes without one.
type handler func(s *Server, ctx *fasthttp.RequestCtx, id string) error

// route is one path pattern of the API.
type route struct {
	pattern string   // the metric label, e.g. "/v1/threads/{thread_id}/runs"
	segs    []string // path segments; "" stands for the id
	idName  string   // what the id is ("thread_id", …), for error messages
	get     handler
	post    handler
	probe   bool   // a probe or /metrics: served on the admin listener, never gated
	stream  bool   // get answers an event stream: no HEAD
	allow   string // the Allow header of a 405
}

// head reports whether the route answers HEAD: as its GET, without the
// body (RFC 9110 §9.3.2; a review found 405), except an event stream.
func (r *route) head() bool { return r.get != nil && !r.stream }

// maxSegs is the most path segments any route has, plus one.
const maxSegs = 6

// routeTable is the client API (spec/http.md). Order does not matter: no
// two patterns match the same path.
var routeTable = []route{
	{pattern: "/v1/runs", segs: []string{"v1", "runs"}, post: (*Server).submitForeground},
	{pattern: "/v1/runs/{run_id}", segs: []string{"v1", "runs", ""}, idName: "run_id", get: (*Server).getRun},
	{pattern: "/v1/runs/{run_id}/decisions", segs: []string{"v1", "runs", "", "decisions"}, idName: "run_id", post: (*Server).sendDecision},
	{pattern: "/v1/threads/{thread_id}/runs", segs: []string{"v1", "threads", "", "runs"}, idName: "thread_id", post: (*Server).submitForeground},
	{pattern: "/v1/threads/{thread_id}/dispatches", segs: []string{"v1", "threads", "", "dispatches"}, idName: "thread_id",
		get: (*Server).listDispatches, post: (*Server).submitBackground},
	{pattern: "/v1/threads/{thread_id}/messages", segs: []string{"v1", "threads", "", "messages"}, idName: "thread_id",
		get: (*Server).listMessages, post: (*Server).sendMessages},
	{pattern: "/v1/threads/{thread_id}/interrupt", segs: []string{"v1", "threads", "", "interrupt"}, idName: "thread_id", post: (*Server).interrupt},
	{pattern: "/v1/threads/{thread_id}/events", segs: []string{"v1", "threads", "", "events"}, idName: "thread_id", get: (*Server).reattach, stream: true},
	{pattern: "/v1/cancel/{id}", segs: []string{"v1", "cancel", ""}, idName: "id", post: (*Server).cancel},
	{pattern: "/v1/dispatches/{dispatch_id}", segs: []string{"v1", "dispatches", ""}, idName: "dispatch_id", get: (*Server).getDispatch},
	{pattern: "/v1/dispatches/{dispatch_id}/requeue", segs: []string{"v1", "dispatches", "", "requeue"}, idName: "dispatch_id", post: (*Server).requeue},
	{pattern: "/v1/dead-letters", segs: []string{"v1", "dead-letters"}, get: (*Server).listDeadLetters},
	{pattern: "/metrics", segs: []string{"metrics"}, get: (*Server).metrics, probe: true},
	{pattern: "/livez", segs: []string{"livez"}, get: (*Server).livez, probe: true},
	{pattern: "/readyz", segs: []string{"readyz"}, get: (*Server).readyz, probe: true},
	{pattern: "/healthz", segs: []string{"healthz"}, get: (*Server).readyz, probe: true},
}

// routeUnmatched labels requests that matched no route.
const routeUnmatched = "unmatched"

func init() {
	for i := range routeTable {
		r := &routeTable[i]
		var methods []string
		if r.get != nil {
			methods = append(methods, "GET")
		}
		if r.head() {
			methods = append(methods, "HEAD")
		}
		if r.post != nil {
			methods = append(methods, "POST")
		}
		r.allow = strings.Join(methods, ", ")
	}
}

// match finds the route of a raw request path (no query). It returns the
// route's index, or -1, and the raw id segment.
func match(path []byte) (int, []byte) {
	var segs [maxSegs][]byte
	if len(path) == 0 || path[0] != '/' {
		return -1, nil
	}
	path = path[1:]
	n := 0
	for {
		if n == maxSegs {
			return -1, nil
		}
		i := bytes.IndexByte(path, '/')
		if i < 0 {
			segs[n] = path
			n++
			break
		}
		segs[n] = path[:i]
		n++
		path = path[i+1:]
	}
next:
	for ri := range routeTable {
		r := &routeTable[ri]
		if len(r.segs) != n {
			continue
		}
		var id []byte
		for i, want := range r.segs {
			if want == "" {
				id = segs[i]
				continue
			}
			if string(segs[i]) != want {
				continue next
			}
		}
		return ri, id
	}
	return -1, nil
}

// validPathID reports whether id is 1–256 characters of [A-Za-z0-9._:-]
// (engine.ValidPathID).
func validPathID[T string | []byte](id T) bool { return engine.ValidPathID(id) }
