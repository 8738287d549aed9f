#!/usr/bin/env bash
# The project's test command (README.md; .ci/run calls exactly this).
#
#   ./scripts/test.sh                 format check, go vet, all tests (e2e included),
#                                     under the race detector
#   ./scripts/test.sh -run TestGC     extra arguments go to "go test"
#   NIXYARD_E2E_DAEMON=nix-daemon ./scripts/test.sh
#                                     run the e2e suite against the stock nix-daemon
#
# On a fresh Debian 12 machine run as root, it first installs what the tests
# drive (Debian's nix-bin 2.8.0, busybox-static, socat, bubblewrap, and
# e2fsprogs for a test's own ext4 file system) and does
# by hand what nix-setup-systemd's postinst would (build users and groups).
# It never writes /etc/nix/nix.conf: every test has its own NIX_CONF_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
	for p in nix-bin busybox-static socat bubblewrap e2fsprogs; do
		installed "$p" || missing+=("$p")
	done
else
	command -v nix-daemon >/dev/null 2>&1 || missing+=(nix-bin)
	[ -x /bin/busybox ] || missing+=(busybox-static)
	command -v socat >/dev/null 2>&1 || missing+=(socat)
	command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
	command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
fi
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
		echo "missing packages: ${missing[*]}; run this script as root on Debian 12 to install them" >&2
		exit 1
	fi
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# What nix-setup-systemd (a recommended package we skip) would do: the build
# users that real Nix needs to build as root (chroot-store fixture builds).
if [ "$(id -u)" -eq 0 ]; then
	getent group nixbld >/dev/null || groupadd -r nixbld
	getent group nix-users >/dev/null || groupadd -r nix-users
	for n in 1 2 3 4 5 6 7 8 9 10; do
		id "nixbld$n" >/dev/null 2>&1 ||
			useradd -r -g nixbld -G nixbld -d /var/empty -s /usr/sbin/nologin -c "Nix build user $n" "nixbld$n"
	done
fi

command -v go >/dev/null 2>&1 || { echo "go not found in PATH (Go $(sed -n 's/^go //p' go.mod) is needed)" >&2; exit 1; }

# --- checks ----------------------------------------------------------------
log "gofmt"
# Exactly the files of the module's packages (testdata is left alone).
files=$(go list -f '{{$d := .Dir}}{{range .GoFiles}}{{$d}}/{{.}} {{end}}{{range .CgoFiles}}{{$d}}/{{.}} {{end}}{{range .TestGoFiles}}{{$d}}/{{.}} {{end}}{{range .XTestGoFiles}}{{$d}}/{{.}} {{end}}' ./...)
# shellcheck disable=SC2086
unformatted=$(gofmt -l $files)
if [ -n "$unformatted" ]; then
	echo "gofmt would change these files (run gofmt -w):" >&2
	echo "$unformatted" >&2
	exit 1
fi

log "go vet ./..."
go vet ./...

log "go test -race ./..."
# -count=1: the e2e package builds ./cmd/nixyard itself, so Go's test cache
# cannot see when the code under test changed. -race: the daemon serves
# every client from one process; under the race detector the e2e package
# builds the daemon with it too, and a race in a daemon's log fails the test.
go test -race -count=1 -timeout 15m "$@" ./...
log "all tests passed"
