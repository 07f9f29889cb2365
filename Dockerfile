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

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/sidecar /usr/local/bin/sidecar
# uid 1337: the uid transparent-interception rules exempt (Istio's convention).
USER 1337:1337
EXPOSE 15001 15006 15000 15020 15090
ENTRYPOINT ["/usr/local/bin/sidecar"]
CMD ["run"]
