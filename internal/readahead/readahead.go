// Package readahead gives back the bytes read ahead of a stream (to tell
// its protocol, to see whether a body has a first byte) before the rest of
// it.
package readahead

import (
	"errors"
	"io"
	"net"
)

// Read is the Read of a stream whose first bytes were read ahead: it
// copies from *head, consuming it, while *head holds anything, and reads r
// after. Like any Read, not for concurrent callers.
func Read(head *[]byte, r io.Reader, p []byte) (int, error) {
	if len(*head) > 0 {
		n := copy(p, *head)
		*head = (*head)[n:]
		return n, nil
	}
	return r.Read(p)
}

// Conn is a connection whose first bytes, Head, were read ahead: Read
// gives them back first. (A server that sniffed a connection's protocol
// hands it on this way.)
type Conn struct {
	net.Conn
	Head []byte
}

func (c *Conn) Read(p []byte) (int, error) { return Read(&c.Head, c.Conn, p) }

// CloseWrite half-closes the connection when it can (a TCP connection):
// a server that closes a connection with a request body left unread
// half-closes it first and lets the client's bytes drain, or the client
// gets a reset instead of the answer.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errNoCloseWrite
}

var errNoCloseWrite = errors.New("readahead: the connection has no CloseWrite")
