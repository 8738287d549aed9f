#!/bin/sh
# Builds a statically linked nixyard (default ./nixyard-static), which runs
# in any Linux image, with or without glibc: for `nixyard doctor` inside CI
# jobs whose image is not the host's (nixos/nix, say). It needs cgo and
# glibc's static libraries (Debian: libc6-dev). The pure-Go user and DNS
# lookups (netgo, osusergo) keep glibc's NSS out of it.
set -eu
cd "$(dirname "$0")/.."
out=${1:-nixyard-static}
exec go build -tags netgo,osusergo -ldflags '-linkmode external -extldflags -static' -o "$out" ./cmd/nixyard
