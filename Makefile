# mailbox-sidecar — `make help` lists the verbs.
GO        ?= go
PKGS      ?= ./...
BENCHTIME ?= 1x
FUZZTIME  ?= 30s
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT    ?= $(shell git rev-parse HEAD 2>/dev/null)
LDFLAGS   := -X main.version=$(VERSION) -X main.commit=$(COMMIT)

.PHONY: help build demo test test-short bench crash soak fuzz lint tidy

help: ## list the verbs
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

build: ## build bin/mailbox-sidecar and bin/echo-agent
	$(GO) build -ldflags "$(LDFLAGS)" -o bin/mailbox-sidecar ./cmd/mailbox-sidecar
	$(GO) build -o bin/echo-agent ./examples/echo-agent

demo: build ## run the sidecar on a local folder with the example agent and show a few runs
	bin/mailbox-sidecar demo --dir ./demo --agent bin/echo-agent

test: ## vet, race-enabled tests with goroutine-leak checks, every benchmark once
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 15m $(PKGS)
	MAILBOX_BENCH_QUEUED=2000 MAILBOX_BENCH_EXPIRED=100 $(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -count=1 -timeout 10m $(PKGS)
	# The scale benchmark's 10 000-queued rows, so that it cannot rot unseen
	# (it did once: bench/README.md, Scale, the seventeenth session).
	$(GO) test -tags scale -run '^$$' -bench '^BenchmarkScale$$' -benchtime 1x -count=1 -timeout 10m ./bench/
	# A short soak: 20 s of load, about 50 s in all (make soak runs it for SOAK_DURATION).
	MAILBOX_SOAK_DURATION=20s MAILBOX_SOAK_GC_TTL=5s MAILBOX_SOAK_GC_INTERVAL=2s MAILBOX_SOAK_SAMPLE=5s \
	  $(GO) test -tags soak -run '^$$' -bench '^BenchmarkSoak$$' -benchtime 1x -count=1 -timeout 10m ./bench/

test-short: ## quick tests without the race detector
	$(GO) test -count=1 -short $(PKGS)

bench: ## benchmarks with allocation counts (figures go to bench/README.md)
	$(GO) test -run '^$$' -bench . -benchmem -count=1 -timeout 60m $(PKGS)
	$(MAKE) scale

# SCALE_AGENTS echo agents share the 64 agent slots (1: one agent with all
# of them, as deployed). MAILBOX_BENCH_CACHE keeps the fixtures.
SCALE_AGENTS ?= 1
# SCALE_CONTEXT, when set, is the sidecar's --context-messages (default: its own).
SCALE_CONTEXT ?=
.PHONY: scale
scale: ## the binary on 10 000 and 1 000 000 queued dispatches (-tags scale; bench/README.md, Scale)
	$(GO) vet -tags scale ./bench/
	MAILBOX_SCALE=1 MAILBOX_SCALE_AGENTS=$(SCALE_AGENTS) MAILBOX_SCALE_CONTEXT=$(SCALE_CONTEXT) $(GO) test -tags scale -run '^$$' -bench '^BenchmarkScale' -benchtime 1x -count=1 -timeout 60m -v ./bench/

# SOAK_DURATION of steady mixed load on the binary and the echo agent,
# sampled every 30 s; gc-ttl 2m so that purges run throughout.
SOAK_DURATION ?= 20m
soak: ## the binary under steady load for SOAK_DURATION: memory, goroutines, sockets, disk, latency (bench/README.md, Soak)
	$(GO) vet -tags soak ./bench/
	MAILBOX_SOAK_DURATION=$(SOAK_DURATION) $(GO) test -tags soak -run '^$$' -bench '^BenchmarkSoak$$' -benchtime 1x -count=1 -timeout 0 -v ./bench/

crash: ## long SIGKILL crash runs: the store (100 cycles), the whole sidecar (60 per variant)
	MAILBOX_CRASH_CYCLES=100 $(GO) test -count=1 -timeout 60m -run 'Crash' -v ./badgerstore/
	MAILBOX_SIDECAR_CRASH_CYCLES=60 $(GO) test -count=1 -timeout 60m -v ./bench/crash/

# fuzz1 runs one fuzz target ($(1) in package $(2)) for FUZZTIME. Go 1.26's
# fuzzing coordinator can fail a target at the end of -fuzztime with
# "context deadline exceeded" when nothing failed (golang/go#75804, fixed
# in Go 1.27): a failure that wrote no new input to testdata runs the
# target once more; one that wrote an input fails at once.
define fuzz1
	@n=$$(ls $(2)testdata/fuzz/$(1) 2>/dev/null | wc -l); \
	$(GO) test -run '^$$' -fuzz '^$(1)$$' -fuzztime $(FUZZTIME) $(2) || { \
	  test "$$(ls $(2)testdata/fuzz/$(1) 2>/dev/null | wc -l)" = "$$n" || exit 1; \
	  echo "$(1) failed without a new input (golang/go#75804): once more"; \
	  $(GO) test -run '^$$' -fuzz '^$(1)$$' -fuzztime $(FUZZTIME) $(2); }
endef

fuzz: ## run each fuzz target for FUZZTIME
	$(call fuzz1,FuzzDecodeDispatch,./badgerstore/)
	$(call fuzz1,FuzzDecodeRun,./badgerstore/)
	$(call fuzz1,FuzzDecodeThreadState,./badgerstore/)
	$(call fuzz1,FuzzDecodeThread,./badgerstore/)
	$(call fuzz1,FuzzDecodeMessage,./badgerstore/)
	$(call fuzz1,FuzzReadLogEntry,./badgerstore/)
	$(call fuzz1,FuzzWholeEntryAt,./badgerstore/)
	$(call fuzz1,FuzzEventType,./engine/)
	$(call fuzz1,FuzzDecodeFrame,./ipc/)
	$(call fuzz1,FuzzValidAgreesWithStdlib,./ipc/)
	$(call fuzz1,FuzzHubConn,./ipc/hub/)
	$(call fuzz1,FuzzAppendJSONString,./ipc/hub/)
	$(call fuzz1,FuzzDecodeSubmit,./proxy/)
	$(call fuzz1,FuzzDecodeMessages,./proxy/)
	$(call fuzz1,FuzzDecodeDecision,./proxy/)

lint: ## gofmt, vet and staticcheck
	@test -z "$$(gofmt -l .)" || (gofmt -l .; exit 1)
	$(GO) vet $(PKGS)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 $(PKGS)

tidy:
	$(GO) mod tidy
