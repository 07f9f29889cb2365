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
# The build line is checked by a test (cmd/sidecar): it must give a static binary.
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /out/sidecar ./cmd/sidecar

# The init container of transparent interception (`sidecar iptables`, see
# pkg/inject): the same binary beside Debian's iptables. Built with
# --target init (make image-init); the final stage below stays the default.
FROM debian:bookworm-slim AS init
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/sidecar /usr/local/bin/sidecar
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["iptables"]

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sidecar /usr/local/bin/sidecar
# uid 1337: the uid transparent-interception rules exempt (Istio's convention).
USER 1337:1337
EXPOSE 15001 15006 15000 15020 15090
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["run"]
