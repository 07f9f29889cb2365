// Package lcs computes a shortest edit script between two sequences by
// their longest common subsequence: the alignment behind `sidecar policy
// diff`'s unified diff and inject's JSON Patch of arrays.
package lcs

// Op is one step of an edit script: Keep, Delete or Insert. A and B are
// the 0-based positions in each sequence where it stands: for Keep the
// elements paired, for Delete a's element (B is where b stands then), for
// Insert b's element (A is where a stands then).
type Op struct {
	Kind Kind
	A, B int
}

// Kind is what an Op does, written as a unified diff writes it.
type Kind byte

const (
	Keep   Kind = ' ' // the element is in both
	Delete Kind = '-' // only in a
	Insert Kind = '+' // only in b
)

// Script returns a shortest edit script from a sequence of n elements to
// one of m, where same(i, j) says whether a's i-th and b's j-th element
// are the same (an equivalence). Where several are shortest, a's elements
// go before b's. It asks same n×m times to fill its table, then once per
// element kept, and holds (n+1)×(m+1) counts: quadratic, for inputs whose
// callers bound that product.
func Script(n, m int, same func(i, j int) bool) []Op {
	// t[i*w+j] is the length of the LCS of a[i:] and b[j:].
	w := m + 1
	t := make([]int32, (n+1)*w)
	for i := n - 1; i >= 0; i-- {
		for j := m - 1; j >= 0; j-- {
			if same(i, j) {
				t[i*w+j] = t[(i+1)*w+j+1] + 1
			} else {
				t[i*w+j] = max(t[(i+1)*w+j], t[i*w+j+1])
			}
		}
	}
	ops := make([]Op, 0, max(n, m))
	i, j := 0, 0
	for i < n || j < m {
		switch {
		case i < n && j < m && t[i*w+j] == t[(i+1)*w+j+1]+1 && same(i, j):
			ops = append(ops, Op{Keep, i, j})
			i, j = i+1, j+1
		case i < n && (j == m || t[(i+1)*w+j] >= t[i*w+j+1]):
			ops = append(ops, Op{Delete, i, j})
			i++
		default:
			ops = append(ops, Op{Insert, i, j})
			j++
		}
	}
	return ops
}
