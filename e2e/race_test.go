//go:build race

package e2e

// Under the race detector (go test -race) the daemon is built with it too.
func init() { raceDetector = true }
