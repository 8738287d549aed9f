package build

// The helper is a C constructor (helper.c) that runs before the Go
// runtime and every package of the binary initialise: when argv[0] is
// initArg0 it reads the spec, makes the sandbox's namespaces, sets up the
// sandbox and execs the builder, or reports the failure on fd 4 and
// exits. This package therefore needs cgo, as the store does (SQLite).

/*
#cgo CFLAGS: -O2 -Wall
*/
import "C"
