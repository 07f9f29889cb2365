// Package readlimit reads what users hand the sidecar (manifests, policy
// files, the config file, standard input) up to one size cap, so that a
// file such as /dev/zero, a runaway pipe or a hostile upload ends in an
// error that names the cap instead of all the memory there is.
package readlimit

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
)

// Max is the most read of one input: 64 MiB, far above any manifest,
// policy or config file, far below a pod's memory.
const Max = 64 << 20

// TooLargeError is an input larger than Max.
type TooLargeError struct {
	// Name is the input: a file's path, or "stdin".
	Name string
	// Limit is the cap it went past, in bytes.
	Limit int64
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("%s is larger than %d MiB, the most sidecar reads of a file or standard input", e.Name, e.Limit>>20)
}

// ReadAll reads r to its end, at most Max bytes; past that it returns a
// *TooLargeError naming the input as name.
func ReadAll(r io.Reader, name string) ([]byte, error) { return readAtMost(r, name, Max, -1) }

// ReadFile reads the file at path as ReadAll does; a regular file larger
// than Max is refused without reading it.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size := int64(-1)
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
		if fi.Size() > Max {
			return nil, &TooLargeError{Name: path, Limit: Max}
		}
		size = fi.Size()
	}
	return readAtMost(f, path, Max, size)
}

// chunk is the unit an input of unknown size is read in: the input is
// held once, in chunks, and copied once at the end, instead of in a
// buffer that doubles (an input that reaches the cap cost three times it).
const chunk = 1 << 20

// readAtMost reads r up to limit bytes; size is its size when known (a
// regular file), else -1.
func readAtMost(r io.Reader, name string, limit, size int64) ([]byte, error) {
	lr := io.LimitReader(r, limit+1)
	if size >= 0 {
		// The size may have changed since: read what is there, up to the limit.
		var b bytes.Buffer
		b.Grow(int(size) + bytes.MinRead)
		if _, err := b.ReadFrom(lr); err != nil {
			return nil, err
		}
		if int64(b.Len()) > limit {
			return nil, &TooLargeError{Name: name, Limit: limit}
		}
		return b.Bytes(), nil
	}
	var (
		chunks [][]byte
		total  int
	)
	for {
		c := make([]byte, min(chunk, limit+1))
		n, err := io.ReadFull(lr, c)
		chunks, total = append(chunks, c[:n]), total+n
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	if int64(total) > limit {
		return nil, &TooLargeError{Name: name, Limit: limit}
	}
	return bytes.Join(chunks, nil), nil
}

// IsTooLarge reports whether err is, or wraps, a *TooLargeError.
func IsTooLarge(err error) bool {
	var e *TooLargeError
	return errors.As(err, &e)
}
