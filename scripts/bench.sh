#!/usr/bin/env bash
# Daemon benchmark: nixyard against the stock nix-daemon, same work, same run.
#
#   scripts/bench.sh [--write-docs] [--stock-only] [nixyard-bench flags…]
#
# Builds nixyard and bench/cmd/nixyard-bench, then runs both daemons on
# identical fresh chroot stores on a scratch file system made for the run
# (journaled ext4 on a loop file; -fs tmpfs for tmpfs) and prints a Markdown
# table of medians and speed-ups. --write-docs also rewrites the generated
# results section of docs/benchmarks.md. --stock-only measures nix-daemon
# alone (e.g. while cmd/nixyard does not build). Needs root and Nix 2.8 on
# PATH; bounded by -timeout (default 40m); cleans up its mounts and processes.
# Useful flags: -reps 5 -qpi-duration 5s -qpi-conns 1,8 -qpi-paths 5000
# -copy-paths 400 -copy-mb 500 -dirty-mb 1024 -fs ext4|tmpfs -keep (keep logs in the work dir).
# Substitution from a local HTTP cache: -skip-subst -subst-paths 400 -subst-mb 600
# -subst-clients 8 (give -fs-size-mb 4096 when running it with the other scenarios).
set -euo pipefail
cd "$(dirname "$0")/.."

write_docs=0 stock_only=0 args=()
for a in "$@"; do
	case $a in
	--write-docs) write_docs=1 ;;
	--stock-only) stock_only=1 ;;
	*) args+=("$a") ;;
	esac
done

if [ "$(id -u)" != 0 ]; then
	echo "scripts/bench.sh: must run as root (it mounts a scratch file system)" >&2
	exit 1
fi

bin=$(mktemp -d /tmp/nyb-bin.XXXXXX)
trap 'rm -rf "$bin"' EXIT

go build -o "$bin/nixyard-bench" ./bench/cmd/nixyard-bench
flags=(-command "scripts/bench.sh${*:+ $*}")
if [ $stock_only = 0 ]; then
	go build -o "$bin/nixyard" ./cmd/nixyard
	rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
	git diff --quiet HEAD -- cmd internal go.mod go.sum 2>/dev/null || rev="$rev+uncommitted changes"
	flags+=(-nixyard "$bin/nixyard" -nixyard-rev "$rev")
fi
if [ $write_docs = 1 ]; then
	flags+=(-docs docs/benchmarks.md)
fi
"$bin/nixyard-bench" "${flags[@]}" ${args[@]+"${args[@]}"}
