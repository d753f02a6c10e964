#!/usr/bin/env bash
# Instructions per request, counted by valgrind (callgrind): a figure that does not
# depend on how busy the machine is, for comparing one build with another.
# Usage: bench/instructions.sh [requests]
#        KEEP=DIR bench/instructions.sh   also keeps the profiles for callgrind_annotate
# Runs `cdn-edge demo` under callgrind, warms a 310,491-byte range and a dictionary
# lookup, zeroes the counters, sends the requests (one connection, keep-alive) for each
# workload and prints the instructions the whole process executed per request. The demo's
# sample origin and dictionary upstream run in the same process but are not asked
# during the counted hits. Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
requests=${1:-2000}
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet
bin=target/release/cdn-edge
http=127.0.0.1:28280 admin=127.0.0.1:29290
dir=$(mktemp -d)
valgrind --tool=callgrind --callgrind-out-file="$dir/callgrind.out" --dump-instr=no \
  "$bin" demo --http $http --admin $admin --origin 127.0.0.1:29200 --dictionary 127.0.0.1:29201 \
  --sink 127.0.0.1:29202 --spool "$dir/spool" >"$dir/demo.log" 2>"$dir/valgrind.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 600); do
  curl -fs -o /dev/null "http://$admin/healthz" && break
  sleep 0.1
done
# Forward delivery starts once the spool is open (slow under valgrind) and builds its
# TLS connector then: wait for it, so that start-up work is not counted as requests'.
for _ in $(seq 1 600); do
  curl -fs "http://$admin/status" | grep -q '"state": "open"' && break
  sleep 0.1
done
sleep 2
query=$(grep -o "range/122638100-122948590?[^']*" "$dir/demo.log" | head -1 | cut -d'?' -f2)
range_url="http://$http/range/122638100-122948590?$query"
dict_url="http://$http/base_dict_getHoverDict_8?form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n"
served() {
  curl -fs "http://$admin/metrics" |
    awk -v r="$1" '$1 ~ "^cdn_edge_requests_total\\{route=\"" r "\"" { n += $2 } END { print n + 0 }'
}
# Reads the total instructions of the last dump.
dumped_ir() {
  awk '/^(summary|totals):/ { print $2 }' "$1" | tail -n1
}
count() {
  local name=$1 route=$2 url=$3
  curl -fs -o /dev/null "$url"
  curl -fs -o /dev/null "$url"
  local before after
  before=$(served "$route")
  callgrind_control -z "$pid" >/dev/null 2>&1
  # wrk stops after its duration; under valgrind the edge answers a few hundred per
  # second, so the duration bounds the count too.
  REQUESTS=$requests wrk -t1 -c1 -d60s -s bench/wrk/count.lua "$url" >/dev/null
  callgrind_control -d "$name" "$pid" >/dev/null 2>&1
  after=$(served "$route")
  local file
  file=$(ls -t "$dir"/callgrind.out.* | head -n1)
  local ir
  ir=$(dumped_ir "$file")
  local n=$((after - before))
  # Pingora's timer thread ticks on its own clock, not per request: shown apart.
  local timer
  timer=$(callgrind_annotate --inclusive=yes --threshold=100 "$file" 2>/dev/null |
    awk '/fast_timeout.rs:std::sys::backtrace::__rust_begin_short_backtrace/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
  timer=${timer:-0}
  echo "$name: $n requests, $((ir / n)) instructions per request (whole process), $(((ir - timer) / n)) without the timer thread"
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP" && cp "$file" "$KEEP/$name.callgrind"
  fi
}
echo "== instructions per request, $requests requests each, one keep-alive connection"
count range_310KB range "$range_url"
count dictionary_hit dictionary "$dict_url"
