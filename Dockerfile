# Multi-stage build of a static sidecar binary on a minimal, non-root base.
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
ENV GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
ARG COMMIT=unknown
# The build lines are checked by a test (cmd/sidecar): static binaries, and
# the per-pod one without Kubernetes' API packages. /out/sidecar is what runs
# in every pod (and the iptables init container): built with -tags
# noinjector, it leaves out inject and webhook, whose packages would cost
# each pod's process some 4 MB of resident memory. /out/sidecar-injector
# is the whole command line, for the webhook's Deployment and for users.
RUN CGO_ENABLED=0 go build -tags noinjector -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/sidecar ./cmd/sidecar
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/sidecar-injector ./cmd/sidecar

# The init container of transparent interception (`sidecar iptables`, see
# pkg/inject): the same binary beside Debian's iptables. Built with
# --target init (make image-init); the final stage below stays the default.
FROM debian:bookworm-slim AS init
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sidecar /usr/local/bin/sidecar
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["iptables"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sidecar /out/sidecar-injector /usr/local/bin/
# uid 1337: the uid transparent-interception rules exempt (Istio's convention).
USER 1337:1337
EXPOSE 15001 15006 15000 15020 15090
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["run"]
