// Package execpages gives back the memory of the executable's pages that
// only starting up used.
//
// The kernel maps a file's pages around every page fault on it (up to 64
// KiB, fault-around), and package initialization touches code and tables
// all over a Go binary: once started, most of the executable's read-only
// segments count in the process's resident set (16 MB of the sidecar's
// 21 MB binary), though serving requests uses far fewer of them.
// Releasing the mappings once started leaves them in the page cache and
// maps again, on their next touch, only what is used from then on.
package execpages
