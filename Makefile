# sidecar — see README.md. `make test` is what CI runs.
GO       ?= go
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT   ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
LDFLAGS  := -s -w -X main.version=$(VERSION) -X main.commit=$(COMMIT)
IMAGE    ?= sidecar:$(VERSION)

export GOTOOLCHAIN := local
export GOFLAGS     := -buildvcs=false

.PHONY: all build test test-tools vet fmt-check leak-check unit run demo bench bench-go tools image clean

all: build

## build: static binary in bin/sidecar (the Dockerfile builds it the same way)
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/sidecar ./cmd/sidecar

## test: tools, vet, gofmt, the goroutine-leak guard, and every test with -race
test: test-tools vet fmt-check leak-check unit

## test-tools: the real servers the integration tests need (Consul), cached by version
test-tools:
	scripts/tools.sh test

vet:
	$(GO) vet ./...

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed on:"; echo "$$out"; exit 1; fi

## leak-check: every package with tests verifies it leaks no goroutine (goleak)
leak-check:
	@scripts/check-leak-guard.sh

unit:
	$(GO) test -race -count=1 -timeout 20m ./...

## run / demo: the sidecar on its embedded default with two example upstreams
run demo:
	$(GO) run ./cmd/sidecar demo

## bench: Go benchmarks, then wrk against direct, sidecar, HAProxy and nginx, then gRPC (ghz) direct vs sidecar
bench: bench-go
	bench/run.sh
	bench/grpc.sh

bench-go: test-tools
	$(GO) test -run '^$$' -bench . -benchmem -count 1 ./pkg/outbound/
	$(GO) test -run '^$$' -bench ConsulPropagation -benchtime 100x ./cmd/sidecar/

## tools: install what tests and benchmarks need (cached, idempotent)
tools:
	scripts/tools.sh all

## image: container image (needs a Docker engine)
image:
	docker build --build-arg VERSION=$(VERSION) --build-arg COMMIT=$(COMMIT) -t $(IMAGE) .

clean:
	rm -rf bin
