package natsstore

import (
	"testing"

	"github.com/nats-io/nats-server/v2/server"
)

// The index consumer's one filter takes the records the index reads
// (dispatches, thread states, runs) and the thread projections, never a
// dedupe lock, a message, a message id lock or a check message: those
// would cost a restart's catch-up the thread logs.
func TestTheIndexFilterTakesTheRecordsTheIndexReads(t *testing.T) {
	for _, prefix := range []string{"mbx", "a.b"} {
		sub := subjects{p: prefix + "."}
		for _, c := range []struct {
			subj string
			want bool
		}{
			{sub.dispatch("d-1"), true},
			{sub.state("th.1"), true},
			{sub.run("r 1"), true},
			{sub.thread("th.1"), true},
			{sub.dedupe("th.1", "key"), false},
			{sub.message("th.1", 7), false},
			{sub.messageID("th.1", "m1"), false},
			{sub.check(), false},
			{"other." + famDispatch + "." + seg("d-1"), false},
		} {
			if got := server.SubjectMatchesFilter(c.subj, indexFilter(sub.p)); got != c.want {
				t.Errorf("prefix %q: %s taken %v, want %v", prefix, c.subj, got, c.want)
			}
		}
	}
}
