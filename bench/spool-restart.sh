#!/usr/bin/env bash
# Restart after kill -9 with a large spool: how long video waits, and how long the spool.
# Usage: bench/spool-restart.sh [spool GiB, default 2]
# 1. Starts `cdn-edge demo` as the video origin, and an edge (`cdn-edge serve`) whose
#    log-blob upstream is a closed loopback port, so every blob stays in the spool.
# 2. wrk POSTs 512 KiB log blobs until the spool holds the asked size, and the edge is
#    killed with SIGKILL while they still arrive (the store needs a repair on open).
# 3. The edge is started again on the same spool; the script polls every 10 ms and prints
#    when the first signed range was served (200) and when the spool was open
#    (/status "state": "open"), with cdn_edge_spool_open_seconds.
# Traffic goes to 127.0.0.1 only; every process is stopped by pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
gib=${1:-2}
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/cdn-edge
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
origin=127.0.0.1:29400 http=127.0.0.1:28480 admin=127.0.0.1:29490
"$bin" demo --http 127.0.0.1:28481 --admin 127.0.0.1:29491 --origin $origin \
  --dictionary 127.0.0.1:29401 --sink 127.0.0.1:29402 --spool "$work/demo-spool" >"$work/demo.log" 2>&1 &
pids+=($!)
query=""
for _ in $(seq 1 200); do
  query=$(grep -a -o "range/122638100-122948590?[^']*" "$work/demo.log" 2>/dev/null | head -1 | cut -d'?' -f2) || true
  [ -n "$query" ] && curl -fs -o /dev/null "http://127.0.0.1:29491/healthz" && break
  sleep 0.05
done
cat >"$work/edge.toml" <<EOF
[listen]
http = "$http"
admin = "$admin"
[signing]
[[signing.keys]]
id = "demo"
secret = "demo-secret-not-for-production"
[origin]
urls = ["http://$origin"]
[forward]
spool_dir = "$work/spool"
spool_max_bytes = $(( (gib + 1) << 30 ))
logblob = "http://127.0.0.1:9"
[log]
level = "warn"
EOF
start_edge() {
  "$bin" serve --conf "$work/edge.toml" >>"$work/edge.log" 2>&1 &
  edge=$!
  pids+=("$edge")
}
spool_bytes() {
  curl -fs "http://$admin/metrics" | awk '/^cdn_edge_spool_bytes\{route="logblob"\}/ {print $2}'
}
start_edge
for _ in $(seq 1 200); do curl -fs -o /dev/null "http://$admin/healthz" && break; sleep 0.05; done
cat >"$work/blob.lua" <<'EOF'
local body = string.rep("b", 512 * 1024)
local n = 0
function request()
  n = n + 1
  return wrk.format("POST", "/log/cadmium/logblob/1?reqId=r" .. n, {}, body)
end
EOF
target=$(( gib << 30 ))
echo "filling the spool to $gib GiB with 512 KiB log blobs"
wrk -t1 -c8 -d600s -s "$work/blob.lua" "http://$http" >/dev/null 2>&1 &
wrk_pid=$!
pids+=("$wrk_pid")
for _ in $(seq 1 6000); do
  b=$(spool_bytes || echo 0)
  [ "${b%.*}" -ge "$target" ] 2>/dev/null && break
  sleep 0.1
done
kill -9 "$edge"
kill "$wrk_pid" 2>/dev/null || true
wait "$edge" 2>/dev/null || true
echo "spool file after SIGKILL: $(du -h "$work/spool/spool.redb" | cut -f1)"

t0=$(date +%s.%N)
start_edge
video="" spool=""
for _ in $(seq 1 12000); do
  now=$(date +%s.%N)
  if [ -z "$video" ] && curl -fs -o /dev/null "http://$http/range/0-1048575?$query"; then
    video=$(awk "BEGIN {printf \"%.3f\", $now - $t0}")
  fi
  if [ -z "$spool" ] && curl -fs "http://$admin/status" 2>/dev/null | grep -q '"state": "open"'; then
    spool=$(awk "BEGIN {printf \"%.3f\", $now - $t0}")
  fi
  [ -n "$video" ] && [ -n "$spool" ] && break
  sleep 0.01
done
open_secs=$(curl -fs "http://$admin/metrics" | awk '/^cdn_edge_spool_open_seconds / {print $2}')
echo "after restart: first range served at ${video:-never} s, spool open at ${spool:-never} s (cdn_edge_spool_open_seconds $open_secs)"
echo "spool after reopening: $(curl -fs "http://$admin/metrics" | grep -E '^cdn_edge_spool_(entries|bytes)\{route="logblob"\}' | tr '\n' ' ')"
