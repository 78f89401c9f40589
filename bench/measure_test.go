//go:build scale || soak

package bench

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Measurements shared by the scale and soak benchmarks.

// ms is d in milliseconds; mib is bytes in MiB.
func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
func mib(bytes int64) float64    { return float64(bytes) / (1 << 20) }

// percentile is the p-th percentile of xs (sorted in place; 0 when empty).
func percentile(xs []time.Duration, p float64) time.Duration {
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	return xs[min(len(xs)-1, int(float64(len(xs))*p/100))]
}

// metricsSnapshot is one /metrics scrape: series (name and labels) → value.
type metricsSnapshot map[string]float64

// scrape reads the node's /metrics.
func scrape(b *testing.B, n *node) metricsSnapshot {
	m := metricsSnapshot{}
	for _, line := range strings.Split(n.get(b, "/metrics"), "\n") {
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			m[line[:i]] = v
		}
	}
	return m
}

func (m metricsSnapshot) completed() float64 {
	return m[`mailbox_runs_total{outcome="completed"}`]
}

// meanMs is the mean of a histogram's observations between prev and m, in
// milliseconds (NaN when nothing was observed).
func (m metricsSnapshot) meanMs(prev metricsSnapshot, name, labels string) float64 {
	sum := m[name+"_sum"+labels] - prev[name+"_sum"+labels]
	count := m[name+"_count"+labels] - prev[name+"_count"+labels]
	if count <= 0 {
		return math.NaN()
	}
	return sum / count * 1000
}

// procMem is a process's memory from /proc/<pid>/status, in bytes.
type procMem struct {
	rss, hwm   int64 // VmRSS, VmHWM
	anon, file int64 // RssAnon (heap, stacks), RssFile (mapped files: Badger's tables and value log)
}

// procStatus reads the process's memory figures.
func procStatus(b *testing.B, pid int) procMem {
	var m procMem
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseInt(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			m.rss = kb << 10
		case "VmHWM:":
			m.hwm = kb << 10
		case "RssAnon:":
			m.anon = kb << 10
		case "RssFile:":
			m.file = kb << 10
		}
	}
	return m
}

// loadAvg1 is the 1-minute load average.
func loadAvg1() float64 {
	data, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(data))
	if len(f) == 0 {
		return math.NaN()
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}
