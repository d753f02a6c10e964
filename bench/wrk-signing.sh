#!/usr/bin/env bash
# What signed-URL checking costs under load, per core: range hits under an Ed25519 URL
# against the same hits under an HMAC URL, in one run, and the good traffic an edge
# keeps while a second wrk sends distinct forged signatures.
#
# Usage: [RUNS=3] [SECS=10] [CONNS=32] [CASES="hmac_16k ed_16k"] bench/wrk-signing.sh
#
# `cdn-edge demo` serves as the origin. Three edges (one worker thread each, pinned to
# cpu 0) stand in front of it:
#   cached    the defaults: verified URLs cached, 20 bad signatures a second per address
#   uncached  signing.verified_cache_bytes = 0: every request verified
#   open      cached, but signing.max_bad_signatures_per_sec = 0: every forgery verified
# wrk runs on cpu 1. Each edge's memory tier is warmed with the whole 128 MiB sample
# object first, so every good request is a memory hit. Runs of the different cases
# alternate; the figures are medians. "cpu us" is the edge's own CPU time per good
# request. Traffic goes to 127.0.0.1 only; the script stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3} SECS=${SECS:-10} CONNS=${CONNS:-32}
for tool in wrk taskset curl; do
  command -v $tool >/dev/null || { echo "$tool is missing: apt-get install wrk util-linux curl" >&2; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cpus (edge on cpu 0, wrk on cpu 1)" >&2; exit 1; }
cargo build --release --quiet
bin=$PWD/target/release/cdn-edge
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

origin=127.0.0.1:29100
"$bin" demo --http 127.0.0.1:29180 --admin 127.0.0.1:29190 --origin $origin \
  --dictionary 127.0.0.1:29101 --sink 127.0.0.1:29102 --spool "$dir/demo-spool" \
  >"$dir/demo.log" 2>&1 &
pids+=($!)
wait_http http://127.0.0.1:29190/healthz

public=$("$bin" keygen --out "$dir/ed.key" | sed -n 's/^public_key = "\(.*\)"$/\1/p')
declare -A http admin pid
edge() { # name port signing-settings
  local name=$1 port=$2 settings=$3
  http[$name]=127.0.0.1:$port admin[$name]=127.0.0.1:$((port + 10))
  cat >"$dir/$name.toml" <<EOF
[listen]
http = "${http[$name]}"
admin = "${admin[$name]}"
[signing]
$settings
[[signing.keys]]
id = "hmac"
secret = "bench-secret"
[[signing.keys]]
id = "ed"
alg = "ed25519"
public_key = "$public"
[cache]
slice_bytes = 1048576
memory_bytes = 268435456
[origin]
urls = ["http://$origin"]
path = "/objects/{o}/{v}"
[server]
threads = 1
upgrade_sock = "$dir/$name.sock"
[log]
access = false
EOF
  CDN_EDGE_LOG=warn taskset -c 0 "$bin" serve --conf "$dir/$name.toml" >"$dir/$name.log" 2>&1 &
  pid[$name]=$!
  pids+=($!)
}
edge cached 29200 ""
edge uncached 29220 "verified_cache_bytes = 0"
edge open 29240 "max_bad_signatures_per_sec = 0"
sign() { # key [--private-key-file F]
  "$bin" sign --conf "$dir/cached.toml" --key "$@" --object sample --version 1 --ttl 86400 --token bench
}
hmac_q=$(sign hmac)
ed_q=$(sign ed --private-key-file "$dir/ed.key")
size=134217728
for name in cached uncached open; do
  wait_http "http://${admin[$name]}/healthz"
  curl -fs -o /dev/null "http://${http[$name]}/?$hmac_q"   # every slice into memory
done

# Other work on the box skews everything: each timed run waits (up to QUIET_WAIT s) for
# the cpus to be idle first.
QUIET_WAIT=${QUIET_WAIT:-120}
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
quiet() {
  local a b c d w
  for ((w = 0; w < QUIET_WAIT; w++)); do
    read -r a b <<<"$(cpu_ticks)"
    sleep 1
    read -r c d <<<"$(cpu_ticks)"
    [ $(((c - a) * 100 / (d - b))) -le 10 ] && return 0
  done
  echo "the machine stayed busy: measuring anyway" >&2
}
ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
declare -A results
# run case edge query range-len [flood-conns]: one timed wrk, optionally beside a forger.
run() {
  local case=$1 name=$2 query=$3 len=$4 flood=${5:-0} out t0 t1 n fpid=""
  quiet
  if [ "$flood" -gt 0 ]; then
    taskset -c 1 wrk -t1 -c"$flood" -d"$((SECS + 2))s" -s bench/wrk/forged.lua \
      "http://${http[$name]}" >"$dir/flood.out" 2>&1 &
    fpid=$!
    sleep 1 # the forger is at full rate before the measured window opens
  fi
  t0=$(ticks "${pid[$name]}")
  out=$(QUERY=$query OBJECT_SIZE=$size RANGE_LEN=$len MODE=path taskset -c 1 \
    wrk -t1 -c"$CONNS" -d"${SECS}s" --latency -s bench/wrk/random_range.lua "http://${http[$name]}")
  t1=$(ticks "${pid[$name]}")
  [ -n "$fpid" ] && wait "$fpid"
  n=$(sed -n 's/^ *\([0-9]*\) requests in.*/\1/p' <<<"$out")
  grep -q non2xx=0 <<<"$out" || { echo "$case: good requests failed:"; echo "$out"; exit 1; }
  local rps p99 cpu bad=""
  rps=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' <<<"$out")
  p99=$(sed -n 's/.*p99_us=\([0-9]*\).*/\1/p' <<<"$out")
  cpu=$(awk -v d=$((t1 - t0)) -v n="$n" -v hz="$hz" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
  [ -n "$fpid" ] && bad=$(sed -n 's/^Requests\/sec: *\([0-9.]*\).*/\1/p' "$dir/flood.out")
  results[$case]+="$rps $p99 $cpu ${bad:-0};"
}
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
col() { tr ';' '\n' <<<"${results[$1]}" | awk -v c="$2" 'NF { print $c }' | median; }

cases=(
  "hmac_310k cached $hmac_q 310491"
  "ed_310k cached $ed_q 310491"
  "hmac_16k cached $hmac_q 16384"
  "ed_16k cached $ed_q 16384"
  "ed_16k_uncached uncached $ed_q 16384"
  "flood_throttled cached $ed_q 16384 32"
  "flood_open open $ed_q 16384 32"
)
for r in $(seq 1 "$RUNS"); do
  for c in "${cases[@]}"; do
    [ -z "${CASES:-}" ] || [[ " $CASES " == *" ${c%% *} "* ]] || continue
    # shellcheck disable=SC2086
    run $c
  done
  echo "run $r of $RUNS done" >&2
done

for k in "${!results[@]}"; do echo "raw $k: ${results[$k]}"; done | sort
printf '%-52s %9s %8s %8s %12s\n' case "req/s" "p99 ms" "cpu us" "forged req/s"
row() { # case label
  [ -n "${results[$1]:-}" ] || return 0
  printf '%-52s %9.0f %8.2f %8s %12.0f\n' "$2" "$(col "$1" 1)" "$(echo "$(col "$1" 2)" | awk '{ print $1 / 1000 }')" \
    "$(col "$1" 3)" "$(col "$1" 4)"
}
row hmac_310k "310,491-byte hits, HMAC URL"
row ed_310k "310,491-byte hits, Ed25519 URL"
row hmac_16k "16 KiB hits, HMAC URL"
row ed_16k "16 KiB hits, Ed25519 URL"
row ed_16k_uncached "16 KiB hits, Ed25519, cache off"
row flood_throttled "16 KiB Ed25519 hits + forger (budget 20/s)"
row flood_open "16 KiB Ed25519 hits + forger (no budget)"
ratio() { [ -n "${results[$1]:-}" ] && [ -n "${results[$2]:-}" ] || { echo -; return; }; awk -v a="$(col "$1" 1)" -v b="$(col "$2" 1)" 'BEGIN { printf "%.3f", a / b }'; }
echo "Ed25519 / HMAC req/s: 310 KB $(ratio ed_310k hmac_310k), 16 KiB $(ratio ed_16k hmac_16k)"
echo "cache on / off (Ed25519, 16 KiB): $(ratio ed_16k ed_16k_uncached)"
echo "good traffic kept beside a forger: budget $(ratio flood_throttled ed_16k), no budget $(ratio flood_open ed_16k)"
for name in cached open; do
  echo "$name: $(curl -fs "http://${admin[$name]}/metrics" | grep -E '^cdn_edge_(signed_url_checks_total|auth_failures_total\{reason="(bad_signature|too_many_bad_signatures)"\})' | tr '\n' ' ')"
done
