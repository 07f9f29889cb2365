# sidecar — see README.md. `make test` is what CI runs.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
IMAGE    ?= sidecar:$(VERSION)
IMAGE_INIT ?= sidecar-init:$(VERSION)

export GOTOOLCHAIN := local
export GOFLAGS     := -buildvcs=false

.PHONY: all build test test-tools vet fmt-check leak-check unit defenses engine docs run demo bench bench-go chaos fuzz tools image image-init clean

all: build

## build: static binaries: bin/sidecar, the whole command line (inject and webhook
## included), and bin/sidecar-pod, what the image runs in pods (-tags noinjector)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/sidecar ./cmd/sidecar
	CGO_ENABLED=0 $(GO) build -tags noinjector -trimpath -ldflags "$(LDFLAGS)" -o bin/sidecar-pod ./cmd/sidecar

## test: tools, vet, gofmt, the goroutine-leak guard, every test with -race,
## and the defenses' tests again at the product's own speed
test: test-tools vet fmt-check leak-check unit defenses engine

## test-tools: the real servers the integration tests need (Consul), cached by version
test-tools:
	scripts/tools.sh test

## vet: go vet of both builds, the whole command line and the per-pod one (-tags noinjector)
vet:
	$(GO) vet ./...
	$(GO) vet -tags noinjector ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

## leak-check: every package with tests verifies it leaks no goroutine (goleak)
leak-check:
	@scripts/check-leak-guard.sh

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

## defenses: the packages whose tests attack the listeners, the transport and
## the webhook, run again without -race: the race detector slows the code
## several times over, and a defense that depends on timing (which connection
## may be closed to make room, what is read before a deadline) must hold at
## the speed of the binary users run
defenses:
	$(GO) test -count=1 -timeout 10m ./pkg/webhook ./pkg/outbound ./pkg/inbound ./pkg/upstream ./pkg/downstream

## engine: the outbound proxy's tests again with its listener on the
## event-loop engine (outboundEngine: loops), which serves their plain
## HTTP/1.1 requests and hands the rest off
engine:
	SIDECAR_TEST_ENGINE=loops $(GO) test -count=1 -timeout 10m ./pkg/outbound

## run / demo: sidecar demo, the sidecar with three example upstreams of user-service (the third fails half its calls)
run demo:
	$(GO) run ./cmd/sidecar demo

## bench: Go benchmarks, then wrk against direct, sidecar, HAProxy and nginx, then gRPC (ghz) direct vs sidecar
bench: bench-go
	bench/run.sh
	bench/grpc.sh

bench-go: test-tools
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./pkg/outbound/
	$(GO) test -run '^$$' -bench ConsulPropagation -benchtime 100x ./cmd/sidecar/
	$(GO) test -run '^$$' -bench DocumentsList -benchmem -count 1 ./pkg/inject/
	$(GO) test -run '^$$' -bench Handshake -benchmem -count 1 ./pkg/mesh/

## chaos: the fault suite's long versions (real sidecar, Consul, upstream processes, toxiproxy),
## then a summary of their figures; `make test` runs the short versions
CHAOS_RUN := TestChaos.*|TestPolicyReloadsUnderLoad|TestSIGTERMUnderLoad
chaos: test-tools
	@out=$$(mktemp); \
	CHAOS=long $(GO) test -count=1 -timeout 30m -run '^($(CHAOS_RUN))$$' -v ./cmd/sidecar/ 2>&1 | tee $$out; \
	echo; echo "== fault suite (CHAOS=long)"; grep -o 'chaos: .*' $$out; \
	grep -q '^ok ' $$out; status=$$?; rm -f $$out; exit $$status

## fuzz: each fuzz target for FUZZTIME (their seed corpora, testdata/fuzz/ included, run in
## `make test`); a crasher is written to the package's testdata/fuzz/ and becomes a seed
FUZZTIME ?= 30s
FUZZ_TARGETS := pkg/downstream:FuzzFraming pkg/downstream:FuzzFramingStream pkg/forward:FuzzForwardHeaders pkg/upstream:FuzzResponse pkg/upstream:FuzzUsualHead \
	pkg/discovery:FuzzHost pkg/outbound:FuzzRouting pkg/policy:FuzzParse
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		echo "== $${t#*:} (./$${t%%:*}, $(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$${t#*:}$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 10s ./$${t%%:*}/; \
	done

## docs: regenerate docs/configuration.md's key table from the settings table
docs:
	$(GO) test -run '^TestConfigReference$$' -count=1 ./cmd/sidecar -update-docs

## tools: install what tests and benchmarks need (cached, idempotent)
tools:
	scripts/tools.sh all

## image: container image (needs a Docker engine)
image:
	docker build --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) -t $(IMAGE) .

## image-init: the init container image of transparent interception (sidecar iptables + Debian's iptables)
image-init:
	docker build --target init --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) -t $(IMAGE_INIT) .

clean:
	rm -rf bin
