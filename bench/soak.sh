#!/usr/bin/env bash
# Soak: the mix of tests/soak.rs (range hits and misses over a 192 MiB catalogue with a
# 64 MiB memory tier and a 96 MiB disk tier, dictionary lookups, events, log blobs) at a
# fixed rate against an optimised edge, with an origin, a dictionary upstream and an
# event sink that each refuse one request in 25 (503); the edge fails over to a second
# origin. Every interval: requests, p50/p99/max latency (from when each request was due),
# miss ratio, errors, edge CPU, RSS, file descriptors, spool records and directory size.
# Usage: bench/soak.sh [seconds, default 1800] [requests/s, default half of an unpaced probe]
#   SOAK_INTERVAL_SECS (60), SOAK_PROBE_SECS (20)
# The edge is pinned to CPU 0 and the load, origins and sink to CPU 1 (one core each).
# Everything listens on 127.0.0.1. Results: target/soak.csv (one row per interval) and
# target/soak.txt (the summary).
set -euo pipefail
cd "$(dirname "$0")/.."
export SOAK_SECS=${1:-1800}
if [ -n "${2:-}" ]; then export SOAK_RATE=$2; fi
export SOAK_EDGE_CPU=0
export SOAK_CSV=$PWD/target/soak.csv SOAK_REPORT=$PWD/target/soak.txt
command -v taskset >/dev/null || { echo "taskset is missing: apt-get install util-linux" >&2; exit 1; }
cargo test --release --test soak --no-run
taskset -c 1 cargo test --release --test soak -- --ignored --exact soak_long --nocapture
echo "== summary (target/soak.txt; per interval: target/soak.csv)"
cat "$SOAK_REPORT"
