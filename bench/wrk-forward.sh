#!/usr/bin/env bash
# Quick load test: 10 KB playback events relayed to the demo's event sink, and 10 KB
# log blobs spooled durably (fsync, group commit), against `cdn-edge demo` on loopback.
# Usage: bench/wrk-forward.sh [seconds] [connections]
# Traffic goes to 127.0.0.1 only; the demo is stopped by pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
http=127.0.0.1:28280 admin=127.0.0.1:29290
work=$(mktemp -d)
target/release/cdn-edge demo --http $http --admin $admin --origin 127.0.0.1:29200 \
  --dictionary 127.0.0.1:29201 --sink 127.0.0.1:29202 --spool "$work/spool" >"$work/log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -fs -o /dev/null "http://$admin/healthz" && break
  sleep 0.1
done
for route in event logblob; do
  echo "== $route: wrk -t1 -c$conns -d${secs}s, 10,000-byte POSTs"
  ROUTE=$route wrk -t1 -c"$conns" -d"${secs}s" --latency -s bench/wrk/event_post.lua "http://$http" |
    grep -E "Requests/sec|p50_us|Non-2xx|Socket errors"
done
curl -fs "http://$admin/metrics" | grep -E '^cdn_edge_(forwarded_total\{result="(relayed|spooled|delivered)"|spool_commits_total)'
