#!/usr/bin/env bash
# Quick load test: random 310,491-byte range hits against `cdn-edge demo` on loopback.
# Usage: bench/wrk-ranges.sh [seconds] [connections] [memory|disk]
# Starts the demo on spare loopback ports, warms the whole 128 MiB sample object into
# the memory tier (or, with "disk", into a disk tier with the memory tier too small to
# hold a slice, so every hit is a disk read), runs wrk (1 thread) for each route form,
# prints the results and stops the demo by pid. Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}
tier=${3:-memory}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/cdn-edge
http=127.0.0.1:28080 admin=127.0.0.1:29090 origin=127.0.0.1:29000
log=$(mktemp)
cache_dir=$(mktemp -d)
extra=()
if [ "$tier" = disk ]; then
  extra=(--memory-bytes 1048576 --disk "$cache_dir" --disk-bytes 1073741824)
fi
"$bin" demo --http $http --admin $admin --origin $origin --dictionary 127.0.0.1:29001 \
  --sink 127.0.0.1:29002 --spool "$cache_dir/spool" "${extra[@]}" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$log" "$cache_dir"' EXIT
for _ in $(seq 1 100); do
  curl -fs -o /dev/null "http://$admin/healthz" && break
  sleep 0.1
done
query=$(grep -o "range/122638100-122948590?[^']*" "$log" | head -1 | cut -d'?' -f2)
size=134217728
curl -fs -o /dev/null "http://$http/?$query"   # warm: every slice into the tier
if [ "$tier" = disk ]; then
  for _ in $(seq 1 200); do
    curl -fs "http://$admin/metrics" | grep -q '^cdn_edge_disk_writes_total 128$' && break
    sleep 0.05
  done
fi
curl -fs "http://$admin/status" | grep -E '"(memory_bytes|memory_entries|bytes|entries)"'
failed=0
for mode in path header; do
  echo "== $mode ($tier tier): wrk -t1 -c$conns -d${secs}s, random 310,491-byte hits"
  out=$(QUERY=$query OBJECT_SIZE=$size MODE=$mode \
    wrk -t1 -c"$conns" -d"${secs}s" --latency -s bench/wrk/random_range.lua "http://$http")
  grep -E "Requests/sec|Transfer/sec|p50_us|Non-2xx|Socket errors" <<<"$out"
  if ! grep -q "non2xx=0$" <<<"$out"; then
    echo "!! some answers were not 2xx: the figures above are not all hits"
    failed=1
  fi
done
curl -fs "http://$admin/metrics" | grep -E '^cdn_edge_(origin_requests_total\{result="ok"\}|cache_lookups_total|cache_corrupt_total)'
exit "$failed"
