#!/usr/bin/env bash
# Every Go package with tests must run goleak.VerifyTestMain, so that a test
# run fails when a test leaves a goroutine behind.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=0
for dir in $(git ls-files '*_test.go' 2>/dev/null | xargs -r -n1 dirname | sort -u); do
	if ! grep -qs 'goleak.VerifyTestMain' "$dir"/*_test.go; then
		echo "leak-check: $dir has tests but no goleak.VerifyTestMain in a TestMain" >&2
		missing=1
	fi
done
[ "$missing" -eq 0 ] && echo "leak-check: every tested package verifies goroutine leaks"
exit "$missing"
