#!/usr/bin/env bash
# A site of three edges on loopback, in one run (about 4 minutes with the defaults):
#   1. Does each slice reach the site from the origin once, with clients spread over
#      the three nodes? LOAD_RUNS times, on a fresh site each time (empty caches): three
#      wrk instances, one per node, run together for LOAD_SECS, each with its own seeded
#      sequence of random 310,491-byte ranges of the 128 MiB object; then one GET of the
#      whole object through node 1 (checked against the origin's bytes) makes sure every
#      slice was touched. Unique bytes = every slice of the object = its size; origin
#      bytes = the sum of cdn_edge_origin_bytes_total over the three nodes. Goal: 1.00.
#   2. A range hit served through a peer against a local hit: node 2 restarted with
#      cluster.keep_non_owned = "none", so it keeps nothing it does not own. One range
#      inside a slice owned by node 1 is sent to node 1 (a local hit) and to node 2 (a
#      hit fetched from node 1), RUNS times each, alternating, wrk -t1 -dSECS, at CONNS
#      connections (concurrent requests for the one slice on node 2 share one request to
#      node 1) and at one connection (every request goes to node 1); medians, ratios.
#
# Usage: [SECS=8] [RUNS=5] [CONNS=32] [LOAD_RUNS=3] [LOAD_SECS=10] [LOAD_CONNS=16] \
#        [BUILD=1] [QUIET_WAIT=5] [RESULTS=bench/results/site-<date>.txt] bench/site.sh
#
#   QUIET_WAIT  before each timed run, wait up to this many seconds for the machine to be
#               idle; a run during which other work took over 5% of the cpus is flagged
#   RESULTS     the output is written there as well (the directory is created)
#   KEEP_LOGS   a directory: the nodes' logs and configs are copied there at the end
#
# What runs (127.0.0.1 only; configs and logs in a temp dir removed at exit; processes
# stopped by pid):
#   origin   `cdn-edge demo`'s sample origin on 127.0.0.1:17100 (its own edge and helpers
#            on 17101-17104, unused), pinned to cpu 1 with wrk; idle during part 2
#   edges    three `cdn-edge serve`, ALL pinned to cpu 0: public http 127.0.0.1:17181-17183,
#            admin 17191-17193, peer listener 17081-17083; one worker thread each
#            ([server] threads = 1), 1 MiB slices, 512 MiB memory tier, no disk tier,
#            access log off, the default peer timeout (origin timeout + 5 s = 15 s)
#   wrk      pinned to cpu 1
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

SECS=${SECS:-8}
RUNS=${RUNS:-5}
CONNS=${CONNS:-32}
LOAD_RUNS=${LOAD_RUNS:-3}
LOAD_SECS=${LOAD_SECS:-10}
LOAD_CONNS=${LOAD_CONNS:-16}
BUILD=${BUILD:-1}
QUIET_WAIT=${QUIET_WAIT:-5}
RESULTS=${RESULTS:-bench/results/site-$(date -u +%Y%m%d-%H%M%S).txt}
for n in "$SECS" "$RUNS" "$CONNS" "$LOAD_RUNS" "$LOAD_SECS" "$LOAD_CONNS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "SECS, RUNS, CONNS, LOAD_*: positive integers" >&2; exit 2; }
done
[[ "$QUIET_WAIT" =~ ^[0-9]+$ ]] || { echo "QUIET_WAIT: a number of seconds" >&2; exit 2; }

SIZE=134217728 SLICE=1048576 LEN=310491 # the demo's sample object (o=sample, v=1)
ORIGIN=127.0.0.1:17100
HTTP=(127.0.0.1:17181 127.0.0.1:17182 127.0.0.1:17183)
ADMIN=(127.0.0.1:17191 127.0.0.1:17192 127.0.0.1:17193)
PEER=(127.0.0.1:17081 127.0.0.1:17082 127.0.0.1:17083)
bin=target/release/cdn-edge
lua=bench/wrk/compare.lua

die() { echo "site: $*" >&2; exit 1; }
command -v wrk >/dev/null || die "wrk is missing: apt-get install wrk"
command -v taskset >/dev/null || die "taskset is missing (util-linux)"
[ "$(nproc)" -ge 2 ] || die "needs 2 cpus: the edges run on cpu 0, wrk on cpu 1"
for p in 17081 17082 17083 17100 17101 17102 17103 17104 17181 17182 17183 17191 17192 17193; do
  [ -z "$(ss -Hltn "sport = :$p")" ] || die "127.0.0.1:$p is in use; this script needs 17081-17083, 17100-17104, 17181-17183, 17191-17193"
done
if [ "$BUILD" = 1 ]; then timeout 3600 cargo build --release --quiet; fi
[ -x "$bin" ] || die "$bin is missing: cargo build --release"

mkdir -p "$(dirname "$RESULTS")"
exec > >(tee "$RESULTS") 2>&1

work=$(mktemp -d /tmp/cdn-site.XXXXXX)
declare -A pid # name -> pid of a process started here
stop() { # name: SIGINT (cdn-edge stops at once), then SIGKILL after 10 s
  local p=${pid[$1]:-}
  [ -n "$p" ] || return 0
  kill -INT "$p" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$p" 2>/dev/null; then kill -KILL "$p" 2>/dev/null || true; fi
  wait "$p" 2>/dev/null || true
  unset "pid[$1]"
}
cleanup() {
  local rc=$? name
  set +e
  for name in "${!pid[@]}"; do stop "$name"; done
  if [ -n "${KEEP_LOGS:-}" ]; then mkdir -p "$KEEP_LOGS" && cp "$work"/*.log "$work"/*.toml "$KEEP_LOGS"/; fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- processes
node_conf() { # node (0-2) keep_non_owned
  cat <<EOF
[listen]
http = "${HTTP[$1]}"
admin = "${ADMIN[$1]}"
peer = "${PEER[$1]}"

[signing]
[[signing.keys]]
id = "demo"
secret = "demo-secret-not-for-production"

[cache]
slice_bytes = $SLICE
memory_bytes = 536870912

[origin]
urls = ["http://$ORIGIN"]
path = "/objects/{o}/{v}"

[cluster]
self = "${PEER[$1]}"
peers = ["${PEER[0]}", "${PEER[1]}", "${PEER[2]}"]
secret = "site-bench-peer-secret"
health_check_ms = 1000
keep_non_owned = "$2"

[server]
threads = 1
grace_period_secs = 1
shutdown_timeout_secs = 1
upgrade_sock = "$work/node$1.sock"

[log]
level = "warn"
access = false
EOF
}
start_node() { # node (0-2) keep_non_owned
  node_conf "$1" "$2" >"$work/node$(($1 + 1)).toml"
  "$bin" check-config "$work/node$(($1 + 1)).toml" >/dev/null
  taskset -c 0 "$bin" serve -c "$work/node$(($1 + 1)).toml" >>"$work/node$(($1 + 1)).log" 2>&1 &
  pid[node$(($1 + 1))]=$!
}
wait_healthy() { # admin address
  for _ in $(seq 1 100); do
    curl -fs -o /dev/null "http://$1/healthz" && return 0
    sleep 0.1
  done
  die "no /healthz from $1 in 10 s"
}
wait_site() { # every node sees all three members healthy
  local n a
  for a in "${ADMIN[@]}"; do wait_healthy "$a"; done
  for _ in $(seq 1 150); do
    n=0
    for a in "${ADMIN[@]}"; do
      n=$((n + $(curl -fs "http://$a/status" | grep -c '"state": *"healthy"' || true)))
    done
    [ "$n" = 9 ] && return 0
    sleep 0.1
  done
  die "the nodes do not all see each other healthy after 15 s"
}
metric() { # admin prefix [part]: the sum of the samples that start with prefix (and hold part)
  curl -fs "http://$1/metrics" | awk -v p="$2" -v q="${3:-}" '
    index($0, p) == 1 && (q == "" || index($0, q)) { s += $NF } END { printf "%d\n", s }'
}
site_metric() { # prefix [part]: summed over the three nodes
  local a s=0
  for a in "${ADMIN[@]}"; do s=$((s + $(metric "$a" "$@"))); done
  echo "$s"
}

taskset -c 1 "$bin" demo --http 127.0.0.1:17101 --admin 127.0.0.1:17102 --origin $ORIGIN \
  --dictionary 127.0.0.1:17103 --sink 127.0.0.1:17104 --spool "$work/spool" \
  --memory-bytes 16777216 >"$work/demo.log" 2>&1 &
pid[demo]=$!
wait_healthy 127.0.0.1:17102
node_conf 0 memory >"$work/sign.toml"
query=$("$bin" sign -c "$work/sign.toml" --key demo --object sample --version 1 --ttl 3600)
sum_origin=$(curl -fs "http://$ORIGIN/objects/sample/1" | md5sum | cut -d' ' -f1)

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ] || commit="$commit (plus uncommitted changes)"
echo "== machine"
echo "cpus:      $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
echo "kernel:    $(uname -sr)"
echo "wrk:       $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
echo "cdn-edge:  $("$bin" --version | awk '{print $2}'), commit $commit"
echo "date:      $(date -u +%FT%TZ)"
echo
echo "== setup"
echo "site:      3 edges, ALL pinned to cpu 0 (taskset -c 0), one worker thread each, 1 MiB slices,"
echo "           512 MiB memory tier, no disk tier, access log off; peers ${PEER[*]}"
echo "load:      wrk pinned to cpu 1 (taskset -c 1); the origin (cdn-edge demo) on cpu 1 too"
echo "object:    o=sample v=1, $SIZE bytes = $((SIZE / SLICE)) slices; each node owns about a third"
echo

# ---------------------------------------------------------------- cpu share of other work
# Other work on the machine skews every number: before each timed run wait (up to
# QUIET_WAIT s) for the cpus to be idle, and measure how much cpu went to anything other
# than the processes started here, wrk and this script during it.
cpu_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat; }
own_ticks() { # user+system ticks of the processes started here and of this script's finished children
  local files=(/proc/$$/stat) name
  for name in "${!pid[@]}"; do files+=("/proc/${pid[$name]}/stat"); done
  cat "${files[@]}" 2>/dev/null | awk -v self=$$ '{ p = $1; sub(/^.*\) /, "")
    s += $12 + $13; if (p == self) s += $14 + $15 } END { print s + 0 }'
}
other_since() { # busy total own (ticks, from before): % of the cpus other work took since
  local now own
  now=$(cpu_ticks) own=$(own_ticks)
  awk -v c0="$1" -v t0="$2" -v o0="$3" -v c1="${now% *}" -v t1="${now#* }" -v o1="$own" 'BEGIN {
    t = t1 - t0; x = (c1 - c0) - (o1 - o0); if (x < 0) x = 0; printf "%d\n", (t > 0 ? 100 * x / t : 0) }'
}
mark=()
quiet() {
  local c t o waited=0
  while :; do
    read -r c t <<<"$(cpu_ticks)"
    o=$(own_ticks)
    sleep 1
    if [ "$(other_since "$c" "$t" "$o")" -le 10 ] || [ "$waited" -ge "$QUIET_WAIT" ]; then break; fi
    waited=$((waited + 1))
  done
  read -ra mark <<<"$(cpu_ticks) $(own_ticks)"
}
disturbed=0 note=""
measured() { # after a timed run: note says so when other work took over 5% of the cpus
  local pct
  pct=$(other_since "${mark[@]}")
  note=""
  if [ "$pct" -gt 5 ]; then
    disturbed=$((disturbed + 1))
    note=$(printf '  !! other work took %d%% of the cpus' "$pct")
  fi
}
wrk_result() { # wrk output -> "req_s p50_ms p99_ms requests non2xx socket_errors"
  awk '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%.0f %.2f %.2f %d %d %d\n", v["requests"] / (v["duration_us"] / 1e6),
      v["p50_us"] / 1000, v["p99_us"] / 1000, v["requests"], v["non2xx"], v["socket_errors"] }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.12g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

# ---------------------------------------------------------------- 1. origin bytes
echo "== 1. origin bytes / unique bytes: $LOAD_RUNS fresh sites; in each, 3 x wrk -t1 -c$LOAD_CONNS -d${LOAD_SECS}s"
echo "   (one per node, together), then one GET of the whole object through node 1"
declare -a L # per load run: "ratio origin_bytes origin_requests peer_ok peer_failed stalled_s"
for ((lr = 1; lr <= LOAD_RUNS; lr++)); do
  if [ "$lr" -gt 1 ]; then for i in 1 2 3; do stop node$i; done; fi
  for i in 0 1 2; do start_node $i memory; done
  wait_site
  quiet
  for i in 0 1 2; do
    MODE=path QUERY=$query OBJECT_SIZE=$SIZE RANGE_LEN=$LEN SEED=$((42 + 3 * lr + i)) \
      timeout $((LOAD_SECS + 60)) taskset -c 1 wrk -t1 -c"$LOAD_CONNS" -d"${LOAD_SECS}s" --timeout 20s \
      --latency -s "$lua" "http://${HTTP[$i]}" >"$work/load$i.out" 2>&1 &
    pid[load$i]=$!
  done
  for i in 0 1 2; do
    wait "${pid[load$i]}" || true
    unset "pid[load$i]"
  done
  measured
  line="  run $lr"
  reqs=0 bad=0
  for i in 0 1 2; do
    read -r rq _ p99 n non2xx sock <<<"$(wrk_result <"$work/load$i.out")"
    [ -n "${n:-}" ] || { cat "$work/load$i.out"; die "wrk gave no result for node $((i + 1))"; }
    line="$line  node $((i + 1)): $rq req/s, p99 $p99 ms;"
    reqs=$((reqs + n)) bad=$((bad + non2xx + sock))
  done
  during=$(site_metric 'cdn_edge_origin_bytes_total ')
  t0=$(date +%s%N)
  sum_edge=$(curl -fs "http://${HTTP[0]}/range/0-$((SIZE - 1))?$query" | md5sum | cut -d' ' -f1)
  whole_ms=$((($(date +%s%N) - t0) / 1000000))
  [ "$sum_edge" = "$sum_origin" ] || die "the object through node 1 differs from the origin's"
  ob=$(site_metric 'cdn_edge_origin_bytes_total ')
  oreq=$(site_metric 'cdn_edge_origin_requests_total{result="ok"} ')
  pok=$(site_metric 'cdn_edge_peer_requests_total{' 'result="ok"')
  pall=$(site_metric 'cdn_edge_peer_requests_total{')
  L[lr]="$(awk -v a="$ob" -v b="$SIZE" 'BEGIN { printf "%.4f", a / b }') $ob $oreq $pok $((pall - pok)) $reqs $bad"
  echo "$line$note"
  printf '         %d requests (%d non-2xx or errors); origin bytes %d during the load, %d after the GET (%d ms);\n' \
    "$reqs" "$bad" "$during" "$ob" "$whole_ms"
  printf '         origin requests %d; peer requests %d ok, %d failed\n' "$oreq" "$pok" "$((pall - pok))"
  if [ "$((pall - pok))" -gt 0 ]; then
    { grep -h '"WARN"' "$work"/node[123].log | grep -v 'failed its health check\|becomes unhealthy' || true; } |
      head -3 | cut -c1-300 | sed 's/^/         log: /'
  fi
done
echo

# ---------------------------------------------------------------- 2. peer hit vs local hit
stop node2
start_node 1 none
wait_site
peer_ok_of() { metric "${ADMIN[1]}" "cdn_edge_peer_requests_total{peer=\"${PEER[0]}\",result=\"ok\"} "; }
cache_status() { curl -fs -o /dev/null -D - "$1" | tr -d '\r' | awk -F': ' 'tolower($1) == "cache-status" { print $2 }'; }
# A slice owned by node 1: node 2 (which keeps nothing) asks node 1 for it.
found=""
for k in $(seq 0 $((SIZE / SLICE - 1))); do
  a=$((k * SLICE + 100000)) b=$((k * SLICE + 100000 + LEN - 1))
  before=$(peer_ok_of)
  cs=$(cache_status "http://${HTTP[1]}/range/$a-$b?$query")
  if [ "$cs" = "cdn-edge; fwd=miss; detail=peer" ] && [ "$(($(peer_ok_of) - before))" = 1 ]; then
    found=$k
    break
  fi
done
[ -n "$found" ] || die "no slice of the object is owned by node 1"
target="/range/$a-$b?$query"
cs_local=$(cache_status "http://${HTTP[0]}$target")
cs_peer=$(cache_status "http://${HTTP[1]}$target")
[ "$cs_local" = "cdn-edge; hit" ] || die "node 1 does not answer the range as a hit: $cs_local"
[ "$cs_peer" = "cdn-edge; fwd=miss; detail=peer" ] || die "node 2 does not answer the range from its peer: $cs_peer"
echo "== 2. range hit through a peer vs local hit: bytes $a-$b (in slice $found, owned by node 1)"
echo "   node 1 (local):  Cache-Status: $cs_local"
echo "   node 2 (peer):   Cache-Status: $cs_peer   (keep_non_owned = \"none\")"
declare -A R     # "kind|conns|run" -> wrk_result
declare -A ASKED # "conns" -> requests node 2 made to node 1 during the peer runs
declare -A GOT   # "conns" -> answers wrk counted from node 2 in those runs
conn_list=("$CONNS")
[ "$CONNS" = 1 ] || conn_list+=(1)
for c in "${conn_list[@]}"; do
  ASKED[$c]=0 GOT[$c]=0
  for ((run = 1; run <= RUNS; run++)); do
    order=(local peer)
    [ $((run % 2)) = 0 ] && order=(peer local)
    for kind in "${order[@]}"; do
      node=${HTTP[0]}
      [ "$kind" = peer ] && node=${HTTP[1]}
      quiet
      before=$(peer_ok_of)
      out=$(MODE=fixed timeout $((SECS + 60)) taskset -c 1 wrk -t1 -c"$c" -d"${SECS}s" --timeout 5s \
        --latency -s "$lua" "http://$node$target" || true)
      measured
      R[$kind|$c|$run]=$(wrk_result <<<"$out")
      [ -n "${R[$kind|$c|$run]}" ] || { echo "$out"; die "wrk gave no result ($kind, -c$c, run $run)"; }
      read -r rq p50 p99 n non2xx sock <<<"${R[$kind|$c|$run]}"
      extra=""
      if [ "$kind" = peer ]; then
        asked=$(($(peer_ok_of) - before))
        ASKED[$c]=$((ASKED[$c] + asked)) GOT[$c]=$((GOT[$c] + n))
        extra="  (node 2 asked node 1 $asked times for $n answers)"
      fi
      [ "$non2xx" = 0 ] && [ "$sock" = 0 ] || extra="$extra  !! non-2xx $non2xx, socket errors $sock"
      printf '   -c%-3s run %d  %-6s %8s req/s  p50 %6s ms  p99 %6s ms%s%s\n' "$c" "$run" "$kind" "$rq" "$p50" "$p99" "$extra" "$note"
    done
  done
done
echo

# ---------------------------------------------------------------- table
cell() { # kind conns field -> median over the runs
  local r v
  for ((r = 1; r <= RUNS; r++)); do
    read -ra v <<<"${R[$1|$2|$r]}"
    echo "${v[$3]}"
  done | median
}
lcol() { # field of L [printf format] -> "median (each run)"
  local r v m all=()
  for ((r = 1; r <= LOAD_RUNS; r++)); do
    read -ra v <<<"${L[r]}"
    all+=("${v[$1]}")
  done
  m=$(printf '%s\n' "${all[@]}" | median)
  [ -z "${2:-}" ] || m=$(printf "$2" "$m")
  if [ "$LOAD_RUNS" = 1 ]; then echo "$m"; else echo "$m (runs: ${all[*]})"; fi
}
echo "== results"
[ "$disturbed" = 0 ] || echo "!! $disturbed timed run(s) shared the cpus with other work (over 5%, flagged above)"
echo "1. origin bytes, $LOAD_RUNS fresh sites (median, then each run):"
printf '   %-46s %s\n' "unique bytes (all $((SIZE / SLICE)) slices of the object)" "$SIZE"
printf '   %-46s %s\n' "origin bytes / unique bytes (goal 1.00)" "$(lcol 0 %.4f)"
printf '   %-46s %s\n' "origin bytes, sum of the three nodes" "$(lcol 1)"
printf '   %-46s %s\n' "origin requests (ok), sum of the three nodes" "$(lcol 2)"
printf '   %-46s %s\n' "peer requests ok" "$(lcol 3)"
printf '   %-46s %s\n' "peer requests failed (timeout, unreachable...)" "$(lcol 4)"
printf '   %-46s %s\n' "client requests during the load" "$(lcol 5)"
printf '   %-46s %s\n' "of which non-2xx or socket errors" "$(lcol 6)"
echo
echo "2. range hit, $LEN bytes, wrk -t1 -d${SECS}s, median of $RUNS runs each:"
printf '   %-36s %5s %9s %8s %8s %14s\n' "" conns req/s "p50 ms" "p99 ms" "asks/answer"
for c in "${conn_list[@]}"; do
  l_rq=$(cell local "$c" 0) l_p50=$(cell local "$c" 1) l_p99=$(cell local "$c" 2)
  p_rq=$(cell peer "$c" 0) p_p50=$(cell peer "$c" 1) p_p99=$(cell peer "$c" 2)
  printf '   %-36s %5s %9s %8s %8s %14s\n' "local hit (node 1, the owner)" "$c" "$l_rq" "$l_p50" "$l_p99" "-"
  printf '   %-36s %5s %9s %8s %8s %14s\n' "through a peer (node 2 asks node 1)" "$c" "$p_rq" "$p_p50" "$p_p99" \
    "$(awk -v a="${ASKED[$c]}" -v b="${GOT[$c]}" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')"
  printf '   %-36s %5s %9s %8s %8s\n' "peer / local" "$c" "$(ratio "$p_rq" "$l_rq")" "$(ratio "$p_p50" "$l_p50")" "$(ratio "$p_p99" "$l_p99")"
done
echo "   (asks/answer: requests node 2 made to node 1 per answer wrk counted from node 2; below 1,"
echo "    concurrent requests for the slice shared one request to node 1)"
echo
echo "total time: $(($(date +%s) - started)) s; written to $RESULTS"
