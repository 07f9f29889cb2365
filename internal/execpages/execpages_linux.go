//go:build linux

package execpages

import (
	"bufio"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Release drops the process's mappings of its executable's read-only
// segments (code, read-only data, the function table) with
// madvise(MADV_DONTNEED): the pages stay in the page cache, and those the
// process uses again are mapped again on their next touch, from memory,
// with no I/O (a minor fault each). It returns the bytes of the mappings
// it released.
//
// Only a mapping that is read-only and holds no page of its own is
// released: dropping a private page that was written (a writable segment,
// or a read-only one a loader relocated, as in a position-independent
// build) would lose what was written.
func Release() (int64, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return 0, err
	}
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	type mapping struct{ start, end uintptr }
	var (
		found []mapping
		cur   *mapping // the executable's read-only mapping being read
	)
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := s.Text()
		// A mapping's first line: "00400000-00cfc000 r-xp 00000000 08:01 1234 /path/to/exe",
		// then its fields: "Anonymous:          0 kB".
		if v, ok := strings.CutPrefix(line, "Anonymous:"); ok {
			if cur != nil && strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")) == "0" {
				found = append(found, *cur)
			}
			cur = nil
			continue
		}
		fields := strings.Fields(line)
		if len(fields) < 5 || !strings.Contains(fields[0], "-") || strings.HasSuffix(fields[0], ":") {
			continue
		}
		cur = nil
		perms := fields[1]
		if len(fields) != 6 || fields[5] != exe || len(perms) != 4 || perms[1] != '-' || perms[3] != 'p' {
			continue
		}
		lo, hi, _ := strings.Cut(fields[0], "-")
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 == nil && err2 == nil && end > start {
			cur = &mapping{uintptr(start), uintptr(end)}
		}
	}
	if err := s.Err(); err != nil {
		return 0, err
	}
	var released int64
	for _, m := range found {
		// By address: these pages are not Go memory, and never were.
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, m.start, m.end-m.start, unix.MADV_DONTNEED); e != 0 {
			return released, e
		}
		released += int64(m.end - m.start)
	}
	return released, nil
}
