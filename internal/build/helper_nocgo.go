//go:build !cgo

package build

// helperMakesNamespaces: the Go helper (init in sandbox.go) cannot make a
// user namespace (the Go runtime is multi-threaded by then), so the daemon
// starts it in the sandbox's namespaces.
const helperMakesNamespaces = false
