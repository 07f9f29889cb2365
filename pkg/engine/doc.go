// Package engine serves plain HTTP/1.1 keep-alive traffic on event loops:
// one loop per CPU, each on an OS thread of its own with an epoll set,
// sockets non-blocking, every connection a small state machine the loop
// drives, no goroutine per connection and no trip through Go's netpoller.
// Timers (read and write timeouts, a handler's deadlines and backoffs) are
// the loop's own, so a request that waits parks as state, not as a thread.
//
// Why it exists: on the sidecar's 2-core pods a goroutine per connection
// and the netpoller's park and wake for every read cost more than the
// forwarding itself (docs/benchmarks.md); HAProxy and nginx run one event
// loop per thread, and so does this.
//
// What it serves is narrow on purpose: a request the listener's fast path
// serves exactly as net/http would and the framing check passes
// (downstream.PlainRequest), with no body or a Content-Length body of at
// most MaxBody bytes, read whole before the handler sees it. The first
// request of a connection that is anything else (malformed, chunked,
// larger, an upgrade, CONNECT, HTTP/1.0, h2c) hands the connection, with
// every byte read of it, to Config.Handoff: the listener's server, which
// answers it as it answers it today, defenses included. So is a request
// the Handler declines. The engine itself never answers a malformed
// request: it has no error path of its own to get wrong.
//
// Towards the upstream it keeps the transport's rules: the request head
// written as upstream.WriteRequestHead writes it, the answer's head parsed
// by upstream.ParseResponseHead (at most MaxResponseHeaderBytes, at most
// upstream.MaxInterimResponses interim answers), its body framed by its
// Content-Length, chunks or close, and a pooled connection reused only
// when the answer ended where its framing said and nothing came while it
// sat idle (an idle connection stays in the epoll set: any byte or close
// retires it at once).
package engine
