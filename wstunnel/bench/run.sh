#!/usr/bin/env bash
# One command for the tunnel benchmark: builds in release, then runs wstunnel-bench inside a
# fresh network namespace (only `lo`, so nothing leaves the machine). Needs root (unshare).
#   EREBE_WSTUNNEL=/path/to/erebe/wstunnel  adds erebe/wstunnel 10.x side by side
#   BENCH_SECS, BENCH_N, BENCH_M, BENCH_K, BENCH_FLEET, BENCH_CASES  (see the bin's docs)
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -p wstunnel --bins
echo "load before: $(cat /proc/loadavg)" >&2
exec unshare --net -- sh -c 'ip link set lo up && exec "$0"' "${CARGO_TARGET_DIR:-target}/release/wstunnel-bench"
