// Package e2e holds the end-to-end tests of nixyard: each test starts a
// daemon on a private store root under its own temporary directory and
// drives it with the real, unmodified Nix client (nix, nix-store, nix-env,
// nix copy over unix:// and ssh-ng://), cross-checking results against real
// Nix opening the same or another store directly.
//
// The same tests run against nixyard (the default: TestMain builds
// ./cmd/nixyard once) or against the stock nix-daemon, which is the
// reference for behaviour:
//
//	NIXYARD_E2E_DAEMON=nix-daemon go test ./e2e
//
// NIXYARD_E2E_BIN=/path/to/nixyard uses a prebuilt binary instead of
// building one. The tests need root (they switch uids to test untrusted
// clients) and Nix 2.8's nix-bin and busybox-static; scripts/test.sh
// installs them. They never touch the machine's /nix or /etc/nix.
package e2e
