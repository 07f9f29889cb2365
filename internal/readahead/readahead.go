// Package readahead gives back the bytes read ahead of a stream (to tell
// its protocol, to see whether a body has a first byte) before the rest of
// it.
package readahead

import "io"

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
