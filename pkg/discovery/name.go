package discovery

// ValidServiceName reports whether name, as ServiceName returns it, can be
// a service name: 1 to 253 bytes of lower-case letters, digits, '-', '_'
// and '.', starting and ending with a letter or digit, with no empty label
// ("a..b"). That is what Consul's catalog and DNS interface accept, and it
// keeps everything a path or a query could be made of ('/', '%', '?', '#',
// '..') out of the names that reach a discovery source. Names come from
// the wire (Host, :authority, absolute URLs, SNI): listeners check them
// once, at the edge, before any lookup. It is wider than the rule for the
// names of policies (pkg/policy: one DNS label), because a host an app
// dials may be a cluster DNS name that only transparent interception maps
// to a service.
func ValidServiceName(name string) bool {
	if len(name) == 0 || len(name) > 253 {
		return false
	}
	if !alnum(name[0]) || !alnum(name[len(name)-1]) {
		return false
	}
	for i := 0; i < len(name); i++ {
		switch c := name[i]; {
		case alnum(c), c == '-', c == '_':
		case c == '.':
			if name[i-1] == '.' {
				return false
			}
		default:
			return false
		}
	}
	return true
}

func alnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }
