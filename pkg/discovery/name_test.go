package discovery

import (
	"strings"
	"testing"
)

func TestValidServiceName(t *testing.T) {
	for _, name := range []string{"a", "user-service", "users.default.svc.cluster.local", "s3", "a_b", "0x", strings.Repeat("a", 253)} {
		if !ValidServiceName(name) {
			t.Errorf("ValidServiceName(%q) = false, want true", name)
		}
	}
	for _, name := range []string{"", "a/../../../kv/sidecar/policies/web", "a..b", ".a", "a.", "-a", "a-", "A", "a b", "a%2fb",
		"a?b", "a#b", "a:80", "[::1]", "a\x00", "é", "a\\b", strings.Repeat("a", 254)} {
		if ValidServiceName(name) {
			t.Errorf("ValidServiceName(%q) = true, want false", name)
		}
	}
}
