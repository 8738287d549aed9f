//go:build cgo

package build

// With cgo, the helper runs as a C constructor, before the Go runtime and
// every package of the binary initialise (which took most of the helper's
// start-up): it reads the spec, makes the sandbox's namespaces, sets up
// the sandbox and execs the builder, or reports the failure on fd 4 and
// exits. The Go helper in init stays for binaries built without cgo.

/*
#cgo CFLAGS: -O2 -Wall
*/
import "C"

// helperMakesNamespaces: the C helper clones the sandbox's process in its
// namespaces itself, so the daemon starts it with a plain spawn.
const helperMakesNamespaces = true
