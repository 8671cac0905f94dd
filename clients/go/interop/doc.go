// Package interop holds the Go client's tests against live toolchain
// servers. They need the environment of the repository's harness:
//
//	cd <repo> && .venv/bin/python -m tests.interop.serve -- bash -c 'cd clients/go && go test -count=1 ./...'
package interop
