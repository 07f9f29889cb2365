// Package readlimit reads what users hand the sidecar (manifests, policy
// files, the config file, standard input) up to one size cap, so that a
// file such as /dev/zero, a runaway pipe or a hostile upload ends in an
// error that names the cap instead of all the memory there is.
package readlimit

import (
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
func ReadAll(r io.Reader, name string) ([]byte, error) { return readAtMost(r, name, Max) }

func readAtMost(r io.Reader, name string, limit int64) ([]byte, error) {
	data, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(data)) > limit {
		return nil, &TooLargeError{Name: name, Limit: limit}
	}
	return data, nil
}

// ReadFile reads the file at path as ReadAll does; a regular file larger
// than Max is refused without reading it.
func ReadFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() && fi.Size() > Max {
		return nil, &TooLargeError{Name: path, Limit: Max}
	}
	return ReadAll(f, path)
}

// IsTooLarge reports whether err is, or wraps, a *TooLargeError.
func IsTooLarge(err error) bool {
	var e *TooLargeError
	return errors.As(err, &e)
}
