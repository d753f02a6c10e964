#!/usr/bin/env bash
# Quick load test: dictionary hits against `cdn-edge demo` on loopback.
# Usage: bench/wrk-dictionary.sh [seconds] [connections]
# Starts the demo on spare loopback ports, warms one lookup (the player's 어 hover,
# a 93-byte JSON answer), runs wrk (1 thread) on it, prints the result and stops the
# demo by pid. Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-32}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
http=127.0.0.1:28180 admin=127.0.0.1:29190
log=$(mktemp)
target/release/cdn-edge demo --http $http --admin $admin --origin 127.0.0.1:29100 \
  --dictionary 127.0.0.1:29101 --sink 127.0.0.1:29102 --spool "$log.spool" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$log" "$log.spool"' EXIT
for _ in $(seq 1 100); do
  curl -fs -o /dev/null "http://$admin/healthz" && break
  sleep 0.1
done
url="http://$http/base_dict_getHoverDict_8?form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n"
curl -fs -o /dev/null "$url"   # warm
echo "== dictionary hit: wrk -t1 -c$conns -d${secs}s, $(curl -fs "$url" | wc -c)-byte JSON"
wrk -t1 -c"$conns" -d"${secs}s" --latency "$url" | grep -E "Requests/sec|Transfer/sec|50%|99%|Non-2xx|Socket errors"
curl -fs "http://$admin/metrics" | grep -E '^cdn_edge_dictionary_(lookups_total\{result="(hit|miss)"\}|upstream_requests_total\{result="ok"\})'
