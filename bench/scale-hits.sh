#!/usr/bin/env bash
# What a memory hit costs the whole edge as the number of cached slices grows.
#
# Usage: [SIZES="10000 100000 1000000"] [S=64] [SECS=10] [CONNS=32] [RANGE_LEN=4096]
#        [BIN=path/to/cdn-edge] bench/scale-hits.sh
#
# For each size N: an edge (one worker thread, pinned to cpu 0; 4 KiB slices; a memory
# tier large enough for N slices) in front of an nginx origin that serves one file of
# S slices under every /objects/{o}/{v}, so N/S distinct objects of S slices each. The
# edge is filled through its origin (every object requested whole, 16 at a time), then
# wrk (one thread on cpu 1) sends RANGE_LEN-byte range hits, each in a random slice of a
# random object. Reported: req/s, p50/p99, the edge's CPU time per hit, and its RSS
# after the fill (per slice, less the slice's 4 KiB). The origin's request count is
# checked to stay put during the hits. Traffic goes to 127.0.0.1 only; the script
# stops everything it started and removes its files.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"10000 100000 1000000"} S=${S:-64} SECS=${SECS:-10} CONNS=${CONNS:-32}
SLICE=4096 RANGE_LEN=${RANGE_LEN:-4096}
for tool in wrk nginx taskset curl python3; do
  command -v $tool >/dev/null || { echo "$tool is missing" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cpus (edge on cpu 0, wrk on cpu 1)" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin cdn-edge
  BIN=${CARGO_TARGET_DIR:-target}/release/cdn-edge
fi
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

wait_http() { # url
  for _ in $(seq 1 200); do curl -fs -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "no answer from $1" >&2; exit 1
}
metric() { # admin name-regex: the sum of matching samples
  curl -fs "http://$1/metrics" | awk -v re="$2" '$1 ~ re { s += $2 } END { printf "%d\n", s }'
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }

# The origin: one file of S slices, under every object path.
head -c $((S * SLICE)) /dev/urandom >"$dir/object.bin"
origin=127.0.0.1:29300
cat >"$dir/nginx.conf" <<NGINX
daemon off;
master_process off;
worker_processes 1;
user root;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $dir/tmp; proxy_temp_path $dir/tmp; fastcgi_temp_path $dir/tmp;
  uwsgi_temp_path $dir/tmp; scgi_temp_path $dir/tmp;
  server {
    listen $origin;
    location /objects/ { default_type video/mp4; root $dir; rewrite ^ /object.bin break; }
  }
}
NGINX
mkdir -p "$dir/tmp"
taskset -c 1 nginx -c "$dir/nginx.conf" &
pids+=($!)
wait_http "http://$origin/objects/a/b"

secret=bench-secret
printf '%-8s %8s %9s %9s %8s %8s %10s %12s\n' slices objects req/s "p50 ms" "p99 ms" "cpu us" "RSS MB" "RSS B/slice"
for n in $SIZES; do
  objects=$(( (n + S - 1) / S ))
  python3 - "$secret" "$objects" >"$dir/queries" <<'PY'
import hashlib, hmac, sys, time
secret, count = sys.argv[1].encode(), int(sys.argv[2])
e = int(time.time()) + 86400
for k in range(count):
    msg = f"o=obj{k}&v=v1&e={e}&t=bench"
    sc = hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()
    print(f"{msg}&sc={sc}")
PY
  http=127.0.0.1:29380 admin=127.0.0.1:29390
  cat >"$dir/edge.toml" <<TOML
[listen]
http = "$http"
admin = "$admin"
[[signing.keys]]
id = "hmac"
secret = "$secret"
[cache]
slice_bytes = $SLICE
memory_bytes = $(( n * (SLICE + 1024) + (64 << 20) ))
meta_ttl_secs = 86400
[origin]
urls = ["http://$origin"]
path = "/objects/{o}/{v}"
[server]
threads = 1
upgrade_sock = "$dir/edge.sock"
[log]
access = false
TOML
  CDN_EDGE_LOG=warn taskset -c 0 "$BIN" serve --conf "$dir/edge.toml" >"$dir/edge.log" 2>&1 &
  edge=$!
  pids+=("$edge")
  wait_http "http://$admin/healthz"
  rss_empty=$(rss_kb $edge)
  # Fill: every object whole, 16 at a time.
  awk -v h="$http" '{ printf "url = \"http://%s/?%s\"\noutput = \"/dev/null\"\n", h, $0 }' \
    "$dir/queries" >"$dir/fill.curl"
  taskset -c 1 curl -s --no-progress-meter --fail-early --parallel --parallel-max 16 -K "$dir/fill.curl"
  for _ in $(seq 1 50); do
    entries=$(curl -fs "http://$admin/status" |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["cache"]["memory_entries"])')
    [ "$entries" -eq $(( objects * S )) ] && break
    sleep 0.1
  done
  [ "$entries" -eq $(( objects * S )) ] || echo "warning: the memory tier holds $entries slices, not $((objects * S))" >&2
  rss_full=$(rss_kb $edge)
  origin_before=$(metric $admin '^cdn_edge_origin_requests_total')
  cpu_before=$(cpu_ticks $edge)
  out=$(QUERIES="$dir/queries" SLICES=$S SLICE_BYTES=$SLICE RANGE_LEN=$RANGE_LEN \
    taskset -c 1 wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s bench/wrk/scale_hits.lua "http://$http")
  cpu_after=$(cpu_ticks $edge)
  origin_after=$(metric $admin '^cdn_edge_origin_requests_total')
  [ "$origin_after" -eq "$origin_before" ] || echo "warning: $((origin_after - origin_before)) origin requests during the hits" >&2
  line=$(grep '^requests=' <<<"$out")
  reqs=$(sed 's/.*requests=\([0-9]*\).*/\1/' <<<"$line")
  p50=$(sed 's/.*p50_us=\([0-9]*\).*/\1/' <<<"$line")
  p99=$(sed 's/.*p99_us=\([0-9]*\).*/\1/' <<<"$line")
  non2xx=$(sed 's/.*non2xx=\([0-9]*\).*/\1/' <<<"$line")
  [ "$non2xx" -eq 0 ] || echo "warning: $non2xx answers were not 2xx" >&2
  tck=$(getconf CLK_TCK)
  awk -v n=$n -v k=$objects -v r=$reqs -v s=$SECS -v p50=$p50 -v p99=$p99 \
    -v cpu=$((cpu_after - cpu_before)) -v tck=$tck -v e=$rss_empty -v f=$rss_full -v sl=$SLICE \
    'BEGIN { printf "%-8d %8d %9.0f %9.2f %8.2f %8.1f %10.0f %12.0f\n", n, k, r / s, p50 / 1000,
      p99 / 1000, cpu / tck * 1e6 / r, f / 1024, (f - e) * 1024 / n - sl }'
  kill $edge; wait $edge 2>/dev/null || true
  pids=("${pids[@]/$edge}")
done
