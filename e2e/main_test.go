package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Which daemon the suite runs against, decided once in TestMain.
var (
	// useStock is true when NIXYARD_E2E_DAEMON=nix-daemon: the reference
	// nix-daemon serves the tests instead of nixyard.
	useStock bool
	// nixyardBin is the nixyard binary under test (empty with useStock).
	nixyardBin string
	// stockDaemon is the absolute path of the reference nix-daemon.
	stockDaemon string
	// busybox is the static busybox used as a builder for fixture builds.
	busybox string
	// raceDetector is true when the tests run under the race detector
	// (race_test.go): the daemon they build has it too, and a race it
	// reports in its log fails the test (see testEnv.startDaemon).
	raceDetector bool
)

// requiredTools are the real Nix client programs the tests drive.
var requiredTools = []string{"nix", "nix-store", "nix-env", "nix-daemon", "bash"}

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "e2e: SKIP: these tests must run as root (they start store daemons and switch uids); run ./scripts/test.sh as root")
		return 0
	}
	for _, tool := range requiredTools {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %s not found in PATH: install Debian's nix-bin (./scripts/test.sh does it)\n", tool)
			return 1
		}
	}
	stockDaemon, _ = exec.LookPath("nix-daemon")
	busybox = "/bin/busybox"
	if _, err := os.Stat(busybox); err != nil {
		fmt.Fprintln(os.Stderr, "e2e: /bin/busybox not found: install busybox-static (./scripts/test.sh does it)")
		return 1
	}

	switch d := os.Getenv("NIXYARD_E2E_DAEMON"); d {
	case "nix-daemon":
		useStock = true
		fmt.Fprintf(os.Stderr, "e2e: testing the reference daemon %s\n", stockDaemon)
	case "", "nixyard":
		if bin := os.Getenv("NIXYARD_E2E_BIN"); bin != "" {
			abs, err := filepath.Abs(bin)
			if err != nil {
				fmt.Fprintf(os.Stderr, "e2e: NIXYARD_E2E_BIN: %v\n", err)
				return 1
			}
			nixyardBin = abs
			break
		}
		dir, err := os.MkdirTemp("", "nixyard-e2e-bin-")
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
			return 1
		}
		defer os.RemoveAll(dir)
		// Tests run the binary as an unprivileged user too (ssh-ng's
		// remote program); MkdirTemp makes the directory 0700.
		if err := os.Chmod(dir, 0o755); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
			return 1
		}
		nixyardBin = filepath.Join(dir, "nixyard")
		args := []string{"build", "-o", nixyardBin}
		if raceDetector {
			args = append(args, "-race")
		}
		build := exec.Command("go", append(args, "./cmd/nixyard")...)
		build.Dir = ".." // the module root; go test runs in the package directory
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: go build ./cmd/nixyard failed: %v\n(set NIXYARD_E2E_DAEMON=nix-daemon to run the suite against the reference daemon)\n", err)
			return 1
		}
		if raceDetector {
			fmt.Fprintf(os.Stderr, "e2e: testing nixyard built from ./cmd/nixyard with the race detector\n")
		} else {
			fmt.Fprintf(os.Stderr, "e2e: testing nixyard built from ./cmd/nixyard\n")
		}
	default:
		fmt.Fprintf(os.Stderr, "e2e: NIXYARD_E2E_DAEMON=%q: want nix-daemon or nixyard\n", d)
		return 1
	}
	return m.Run()
}
