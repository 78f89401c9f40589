package agent_test

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/mailbox-sidecar/mailbox-sidecar/ipc"
	"github.com/mailbox-sidecar/mailbox-sidecar/ipc/agent"
)

// A failure's message is cut to MaxFailureMessage (at a character
// boundary): it goes in the FINISH twice, and a 9 MiB one made the FINISH
// too large, so that the SDK sent a permanent result_too_large for a
// transient failure (found by review). The kind and code are kept.
func TestAFailuresMessageIsCut(t *testing.T) {
	long := strings.Repeat("é", 5<<20) // 10 MiB, two bytes a character
	res := agent.Transient("upstream_503", long)
	payload, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	if err := ipc.CheckPayload(ipc.TypeFinish, payload); err != nil {
		t.Fatalf("the FINISH of a transient failure with a long message: %v", err)
	}
	msg := res.Error.Message
	if res.Error.Kind != ipc.KindTransient || res.Error.Code != "upstream_503" || len(msg) > agent.MaxFailureMessage ||
		!utf8.ValidString(msg) || !strings.HasSuffix(msg, "…") {
		t.Fatalf("error %s/%s with a message of %d bytes (valid UTF-8 %v); want transient/upstream_503, cut to %d with a mark",
			res.Error.Kind, res.Error.Code, len(msg), utf8.ValidString(msg), agent.MaxFailureMessage)
	}
	if short := agent.Permanent("bad_input", "no"); short.Error.Message != "no" {
		t.Fatalf("a short message changed: %q", short.Error.Message)
	}
}
