package inject

import (
	"fmt"
	"regexp"

	"github.com/sidecar-mesh/sidecar/pkg/policy"
)

// imageRE is the grammar of an image reference the kubelet accepts
// (NAME[:TAG][@DIGEST], as in the distribution project's reference
// package): an image outside it leaves the pod stuck in InvalidImageName.
var imageRE = func() *regexp.Regexp {
	const (
		alnum     = `[a-z0-9]+`
		separator = `(?:[._]|__|[-]+)`
		component = alnum + `(?:` + separator + alnum + `)*`
		domainCmp = `(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])`
		domain    = `(?:` + domainCmp + `(?:\.` + domainCmp + `)*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?`
		name      = `(?:` + domain + `/)?` + component + `(?:/` + component + `)*`
		tag       = `[\w][\w.-]{0,127}`
		digest    = `[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`
	)
	return regexp.MustCompile(`^(` + name + `)(?::` + tag + `)?(?:@` + digest + `)?$`)
}()

// maxImageName is the longest repository name (domain and path) the
// grammar allows.
const maxImageName = 255

// checkImage checks an image reference as the kubelet will.
func checkImage(v string) error {
	m := imageRE.FindStringSubmatch(v)
	if m == nil {
		return fmt.Errorf("%s is not an image reference (NAME[:TAG][@DIGEST], e.g. registry.example.com/mesh/sidecar:1.0.0)", policy.Quote(v))
	}
	if len(m[1]) > maxImageName {
		return fmt.Errorf("%s: the repository name is longer than %d characters", policy.Quote(v), maxImageName)
	}
	return nil
}
