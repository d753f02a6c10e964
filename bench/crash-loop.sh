#!/usr/bin/env bash
# Crash loop: N cycles of load (events, log blobs, cold slice fills) → SIGKILL at a random
# moment → restart on the same spool and disk tier; then every acknowledged request must
# have reached the test sink, none twice from one process, and the disk tier alone must
# serve only the origin's bytes. The loop is tests/crash_loop.rs (`crash_loop_long`).
# Usage: bench/crash-loop.sh [cycles, default 50] [seed, default random]
#   CRASH_MAX_LOAD_MS   longest load before a kill (default 1500)
#   PROFILE=release     an optimised edge (default: the test build, quicker to build)
# Everything listens on 127.0.0.1; the report is printed and kept in target/crash-loop.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export CRASH_CYCLES=${1:-50}
if [ -n "${2:-}" ]; then export CRASH_SEED=$2; fi
export CRASH_REPORT=$PWD/target/crash-loop.txt
flags=()
if [ "${PROFILE:-dev}" = release ]; then flags+=(--release); fi
mkdir -p target
cargo test "${flags[@]}" --test crash_loop -- --ignored --exact crash_loop_long --nocapture
echo "== report (target/crash-loop.txt)"
cat "$CRASH_REPORT"
