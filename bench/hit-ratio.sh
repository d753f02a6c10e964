#!/usr/bin/env bash
# Byte hit ratio of cdn-edge, nginx and Varnish on one seeded synthetic video trace, with
# the same cache size, against the offline optimum (Belady's MIN) and plain LRU computed
# on the same trace (bench/hitratio/trace.py says what the trace is).
#
# Usage: [SEED=1] [CACHE_MB=1024] [REQUESTS=12000] [TITLES=200] [CONNS=16] [BUILD=1] \
#        [SYSTEMS="cdn-edge nginx varnish"] [EDGE_DISK_MB=0] [EDGE_DISK_POLICIES=video] \
#        [TRACE_ARGS=...] bench/hit-ratio.sh
#
#   SEED        the trace's seed: the same seed gives the same trace, byte for byte
#   CACHE_MB    cache of every system: cdn-edge's memory tier, nginx's proxy_cache
#               max_size (tmpfs), Varnish's malloc storage
#   REQUESTS    about this many requests (1-4 MiB ranges; about 2.6 MB each)
#   TITLES      catalogue size (100 MB-2 GB each)
#   CONNS       wrk connections replaying the trace in order (one thread)
#   BUILD       1: cargo build --release first; 0: use target/release/cdn-edge as it is
#   SYSTEMS     which systems to replay through, in this order
#   EDGE_POLICIES  cdn-edge's cache.memory_policy values to replay with, one run each
#               (default "video", the default; e.g. "video windowed lru tinylfu")
#   EDGE_DISK_MB  with a size, a second cdn-edge run ("cdn-edge+disk") keeps CACHE_MB in
#               its memory tier and EDGE_DISK_MB more in its disk tier (not comparable to
#               the peers' single cache of CACHE_MB: reported apart), named
#               "cdn-edge+disk:<memory policy>,<disk policy>"
#   EDGE_DISK_POLICIES  cache.disk.policy values for those runs, one run each
#               (default "video", the default; "video lru" compares them)
#   TRACE_ARGS  more options for trace.py (--alpha, --one-hit, --drift, ...)
#   KEEP        1: keep the temp dirs (configs, logs, trace) for a look afterwards
#
# Each system starts with an empty cache, replays the whole trace once (wrk -t1
# -cCONNS, bench/wrk/replay.lua, every answer must be a 206) and is stopped. Each has an
# origin of its own (one nginx, a port per system) serving every title as a sparse file
# of its size, so its access log counts that system's origin requests and bytes. Byte
# hit ratio = 1 - origin bytes / client bytes: a slice fetched whole for part of it
# counts in full, as it costs the site. A system whose cache held more than CACHE_MB on
# average (nginx's cache manager lets it run over max_size) is also set against MIN at
# that average ("of MIN held"). Everything listens on 127.0.0.1:18090-18098.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib/peers.sh
. bench/lib/peers.sh

SEED=${SEED:-1}
CACHE_MB=${CACHE_MB:-1024}
REQUESTS=${REQUESTS:-12000}
TITLES=${TITLES:-200}
CONNS=${CONNS:-16}
BUILD=${BUILD:-1}
SYSTEMS=${SYSTEMS:-cdn-edge nginx varnish}
EDGE_DISK_MB=${EDGE_DISK_MB:-0}
EDGE_POLICIES=${EDGE_POLICIES:-video}
EDGE_DISK_POLICIES=${EDGE_DISK_POLICIES:-video}
TRACE_ARGS=${TRACE_ARGS:-}
for n in "$SEED" "$CACHE_MB" "$REQUESTS" "$TITLES" "$CONNS"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "SEED, CACHE_MB, REQUESTS, TITLES, CONNS: positive integers" >&2; exit 2; }
done
[[ "$EDGE_DISK_MB" =~ ^[0-9]+$ ]] || { echo "EDGE_DISK_MB: a number of MiB" >&2; exit 2; }
for s in $SYSTEMS; do
  case $s in cdn-edge | nginx | varnish) ;; *) echo "SYSTEMS: cdn-edge, nginx, varnish" >&2; exit 2 ;; esac
done
for p in $EDGE_POLICIES; do
  case $p in video | windowed | lru | tinylfu) ;; *) echo "EDGE_POLICIES: video, windowed, lru, tinylfu" >&2; exit 2 ;; esac
done
for p in $EDGE_DISK_POLICIES; do
  case $p in video | lru) ;; *) echo "EDGE_DISK_POLICIES: video, lru" >&2; exit 2 ;; esac
done
runs=""
for s in $SYSTEMS; do
  if [ "$s" = cdn-edge ]; then
    for p in $EDGE_POLICIES; do runs="$runs cdn-edge:$p"; done
  else
    runs="$runs $s"
  fi
done
if [ "$EDGE_DISK_MB" != 0 ]; then
  for p in $EDGE_DISK_POLICIES; do runs="$runs cdn-edge+disk:${EDGE_POLICIES%% *},$p"; done
fi
SYSTEMS=$runs

SLICE=1048576 SECRET=hit-ratio-secret-7d2e
EDGE=127.0.0.1:18093 EDGE_ADMIN=127.0.0.1:18094 NGINX=127.0.0.1:18095
VARNISH=127.0.0.1:18096 VARNISH_ADMIN=127.0.0.1:18097
bin=target/release/cdn-edge

work=$(mktemp -d /tmp/cdn-hit-ratio.XXXXXX)
shm=$(mktemp -d /dev/shm/cdn-hit-ratio.XXXXXX)
mkdir -p "$work"/{titles,tmp}
pids=()      # "pid:signal" of the system under test, stopped after its replay and at exit
origin_pid=""
die() { echo "hit-ratio: $*" >&2; exit 1; }
stop_all() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do peers_stop "${pids[i]%%:*}" "${pids[i]##*:}"; done
  pids=()
}
cleanup() {
  local rc=$?
  set +e
  peers_restore_policy
  stop_all
  [ -z "$origin_pid" ] || peers_stop "$origin_pid" TERM
  if [ "${KEEP:-0}" = 1 ]; then echo "kept: $work $shm"; else rm -rf "$work" "$shm"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

peers_install nginx varnish wrk python3 curl
if [ "$BUILD" = 1 ]; then timeout 3600 cargo build --release --quiet; fi
[ -x "$bin" ] || die "$bin is missing: cargo build --release"
for p in $(seq 18090 18098); do
  [ -z "$(ss -Hltn "sport = :$p")" ] || die "127.0.0.1:$p is in use; this script needs 18090-18098"
done

# ---------------------------------------------------------------- trace and limits
expires=$(($(date +%s) + 86400))
# shellcheck disable=SC2086 # TRACE_ARGS is a list of options
python3 bench/hitratio/trace.py --seed "$SEED" --requests "$REQUESTS" --titles "$TITLES" \
  --cache-bytes $((CACHE_MB * 1048576)) --slice-bytes "$SLICE" --trace "$work/trace" \
  --hmac-secret "$SECRET" --expires "$expires" \
  --lru-also $((CACHE_MB * 2 * 1048576)) $((CACHE_MB * 4 * 1048576)) $TRACE_ARGS >"$work/limits.json"
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$work/limits.json" "$1"; }
client_bytes=$(field client_bytes)
requests=$(field requests)
while read -r kind title size; do
  [ "$kind" = T ] && truncate -s "$size" "$work/titles/$title"
done <"$work/trace"

echo "== machine"
echo "cpus:      $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
echo "memory:    $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "nginx:     $(/usr/sbin/nginx -v 2>&1 | sed 's/^nginx version: //'), varnish: $(/usr/sbin/varnishd -V 2>&1 | head -1 | sed 's/^varnishd (\(.*\))$/\1/')"
echo "cdn-edge:  $("$bin" --version | awk '{print $2}'), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
echo "date:      $(date -u +%FT%TZ)"
echo
echo "== trace (seed $SEED)"
python3 - "$work/limits.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
g = 1e9
print(f"requests {d['requests']}, titles {d['titles']} ({d['catalogue_bytes']/g:.0f} GB catalogue), "
      f"client bytes {d['client_bytes']/g:.2f} GB")
print(f"distinct 1 MiB slices {d['distinct_slices']} ({d['slices_used_once']} used once); "
      f"cache {d['cache_bytes'] >> 20} MiB = {d['cache_bytes'] // d['slice_bytes']} slices")
print(f"no cache could save more than {1 - d['compulsory_origin_bytes']/d['client_bytes']:.3f} "
      "(every distinct slice fetched once)")
EOF
echo

# ---------------------------------------------------------------- origins
peers_nginx_paths "$work"
origin_server() { # port name
  cat <<EOF
  server {
    listen 127.0.0.1:$1;
    access_log $work/origin-$2.log counted;
    location ~ ^/objects/([A-Za-z0-9_-]+)/v1\$ {
      alias $work/titles/\$1;
      default_type video/mp4;
    }
    location / { return 404; }
  }
EOF
}
cat >"$work/origin.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
pid $work/origin.pid;
error_log $work/origin-error.log warn;
events { worker_connections 4096; }
http {
  $temp_paths
  log_format counted '\$status \$body_bytes_sent';
  sendfile on;
  keepalive_requests 1000000;
$(origin_server 18090 cdn-edge)
$(origin_server 18091 nginx)
$(origin_server 18092 varnish)
$(origin_server 18098 cdn-edge+disk)
}
EOF
/usr/sbin/nginx -p "$work/" -e "$work/origin-error.log" -c "$work/origin.conf" &
origin_pid=$!
peers_wait_http origin http://127.0.0.1:18090/

# ---------------------------------------------------------------- systems
start_system() { # name: start it with an empty cache; sets target and form
  case $1 in
    cdn-edge:* | cdn-edge+disk:*)
      local origin=127.0.0.1:18090 disk="" policy=${1#*:}
      if [ "${1%%:*}" = cdn-edge+disk ]; then
        origin=127.0.0.1:18098
        rm -rf "$work/disk" && mkdir -p "$work/disk"
        disk="[cache.disk]
path = \"$work/disk\"
max_bytes = $((EDGE_DISK_MB * 1048576))
policy = \"${policy#*,}\""
        policy=${policy%,*}
      fi
      cat >"$work/edge.toml" <<EOF
$(peers_edge_head "$EDGE" "$EDGE_ADMIN" "$SECRET")

[cache]
slice_bytes = $SLICE
memory_bytes = $((CACHE_MB * 1048576))
memory_policy = "$policy"
$disk

[origin]
urls = ["http://$origin"]
path = "/objects/{o}/{v}"

[server]
$(peers_edge_quick_stop "$work")

[log]
access = false
EOF
      "$bin" serve --conf "$work/edge.toml" >"$work/$1.log" 2>&1 &
      pids+=("$!:INT")
      peers_wait_http "$1" "http://$EDGE_ADMIN/healthz"
      target=$EDGE form=signed
      ;;
    nginx)
      rm -rf "${shm:?}/video" && mkdir -p "$shm/video"
      cat >"$work/nginx-edge.conf" <<EOF
$user_line
worker_processes auto;
daemon off;
pid $work/nginx-edge.pid;
error_log $work/nginx-edge-error.log warn;
events { worker_connections 4096; }
http {
  $temp_paths
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  proxy_cache_path $shm/video levels=1:2 keys_zone=video:64m max_size=${CACHE_MB}m inactive=1d use_temp_path=off;
  upstream origin { server 127.0.0.1:18091; keepalive 64; }
  server {
    listen $NGINX;
    location ~ ^/objects/[^/]+/[^/]+\$ {
$(peers_nginx_slices)
    }
    location / { return 404; }
  }
}
EOF
      /usr/sbin/nginx -p "$work/" -e "$work/nginx-edge-error.log" -c "$work/nginx-edge.conf" &
      pids+=("$!:TERM")
      peers_wait_http nginx "http://$NGINX/"
      target=$NGINX form=plain
      ;;
    varnish)
      # Varnish has no slicing: a Range miss would fetch the whole title (up to 2 GB).
      # The usual way round it for byte-range video caches each distinct range as an
      # object of its own, keyed by URL and Range, which suits this trace: players ask
      # for the same segment ranges of a title.
      cat >"$work/varnish.vcl" <<EOF
vcl 4.1;
backend origin { .host = "127.0.0.1"; .port = "18092"; }
sub vcl_recv {
  if (req.url == "/replay-end") { return (synth(404)); }
  if (req.http.Range ~ "^bytes=") { set req.http.x-range = req.http.Range; }
}
sub vcl_hash {
  if (req.http.x-range) { hash_data(req.http.x-range); unset req.http.Range; }
}
sub vcl_backend_fetch {
  if (bereq.http.x-range) { set bereq.http.Range = bereq.http.x-range; }
}
sub vcl_backend_response {
  if (bereq.http.x-range && beresp.status == 206) {
    set beresp.ttl = 1d;
    # Varnish refuses a cached 206 that keeps its Content-Range; it is put back on delivery.
    set beresp.http.x-content-range = beresp.http.Content-Range;
    unset beresp.http.Content-Range;
  }
}
sub vcl_deliver {
  if (resp.http.x-content-range) {
    set resp.http.Content-Range = resp.http.x-content-range;
    unset resp.http.x-content-range;
  }
}
EOF
      rm -rf "$work/varnish"
      /usr/sbin/varnishd -F -j none -a "$VARNISH" -T "$VARNISH_ADMIN" -n "$work/varnish" \
        -f "$work/varnish.vcl" -s "malloc,${CACHE_MB}M" -P "$work/varnish.pid" \
        >"$work/varnish.log" 2>&1 &
      pids+=("$!:TERM")
      peers_wait_http varnish "http://$VARNISH/"
      target=$VARNISH form=plain
      ;;
  esac
}

occupancy_mb() { # system: MiB its cache holds now
  case $1 in
    cdn-edge:* | cdn-edge+disk:*)
      curl -s -m 2 "http://$EDGE_ADMIN/metrics" |
        awk '/^cdn_edge_cache_bytes\{tier="memory"\}/ { printf "%.0f\n", $2 / 1048576 }' ;;
    nginx) du -sm "$shm/video" | cut -f1 ;;
    varnish)
      varnishstat -n "$work/varnish" -1 -f SMA.s0.g_bytes | awk '{ printf "%.0f\n", $2 / 1048576 }' ;;
  esac
}

declare -A R # name -> "seconds ok bad origin_requests origin_bytes held_avg_mib held_max_mib"
for s in $SYSTEMS; do
  olog=$work/origin-${s%%:*}.log # cdn-edge's runs share one origin, one after another
  : >"$olog"
  start_system "$s"
  t0=$(date +%s.%N)
  TRACE="$work/trace" FORM=$form wrk -t1 -c"$CONNS" -d3600s -T60s -s bench/wrk/replay.lua \
    "http://$target" >"$work/wrk-$s.out" 2>&1 &
  wrk_pid=$!
  # What each cache really held, every 0.5 s: nginx enforces max_size from its cache
  # manager process, which sleeps up to 10 s between passes.
  (
    while kill -0 "$wrk_pid" 2>/dev/null; do
      occupancy_mb "$s" >>"$work/held-$s" || true
      sleep 0.5
    done
  ) &
  sampler=$!
  # wrk sleeps out -d; the replay prints its line when the last answer is in.
  for _ in $(seq 1 36000); do
    grep -q '^REPLAY' "$work/wrk-$s.out" && break
    kill -0 "$wrk_pid" 2>/dev/null || break
    sleep 0.1
  done
  t1=$(date +%s.%N)
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" || true
  wait "$sampler" || true
  line=$(grep -m1 '^REPLAY' "$work/wrk-$s.out") || die "$s: the replay did not finish: $(cat "$work/wrk-$s.out")"
  read -r ok bad < <(sed -E 's/.*ok=([0-9]+) bad=([0-9]+).*/\1 \2/' <<<"$line")
  stop_all
  read -r oreq obytes < <(awk '{ n++; b += $2 } END { printf "%d %.0f\n", n, b }' "$olog")
  read -r held_avg held_max < <(awk '{ n++; t += $1; if ($1 > m) m = $1 }
    END { if (n) printf "%.0f %.0f\n", t / n, m; else print "0 0" }' "$work/held-$s")
  secs=$(echo "$t1 - $t0" | bc)
  R[$s]="$secs $ok $bad $oreq $obytes $held_avg $held_max"
  printf '%-14s replayed in %6.1f s: %d answers 206, %d other; origin %d requests, %.2f GB;\n' \
    "$s" "$secs" "$ok" "$bad" "$oreq" "$(echo "$obytes / 1000000000" | bc -l)"
  printf '%-14s its cache held %d MiB on average, at most %d MiB (sampled every 0.5 s)\n' "" "$held_avg" "$held_max"
  [ "$bad" = 0 ] || echo "!! $s: $bad answers were not 206 (KEEP=1 keeps the logs)"
done
peers_stop "$origin_pid" TERM
origin_pid=""

echo
echo "== byte hit ratio (1 - origin bytes / client bytes), cache $CACHE_MB MiB each, seed $SEED"
# MIN again at the size each system's cache held on average, where that was more than
# CACHE_MB (nginx's cache manager lets it run over max_size): a system is compared with
# the optimum for the memory it used, not only for the size it was given.
declare -A MIN_AT # MiB -> MIN's byte hit ratio at that size
MIN_AT[$CACHE_MB]=$(field belady_byte_hit_ratio)
for s in $SYSTEMS; do
  read -r _ _ _ _ _ held_avg _ <<<"${R[$s]}"
  if [ "$held_avg" -gt $((CACHE_MB * 21 / 20)) ] && [ -z "${MIN_AT[$held_avg]:-}" ]; then
    # shellcheck disable=SC2086 # TRACE_ARGS is a list of options
    MIN_AT[$held_avg]=$(python3 bench/hitratio/trace.py --seed "$SEED" --requests "$REQUESTS" \
      --titles "$TITLES" --cache-bytes $((held_avg * 1048576)) --slice-bytes "$SLICE" $TRACE_ARGS |
      python3 -c "import json,sys; print(json.load(sys.stdin)['belady_byte_hit_ratio'])")
  fi
done
printf '%-34s %10s %10s %11s %16s %11s\n' system "origin GB" "hit ratio" "of optimum" "held MiB avg/max" "of MIN held"
best=${MIN_AT[$CACHE_MB]}
row() { # name origin_bytes ratio held [MIN's ratio at the size held]
  printf '%-34s %10.2f %10.3f %11.2f %16s %11s\n' "$1" "$(echo "$2 / 1000000000" | bc -l)" "$3" \
    "$(echo "$3 / $best" | bc -l)" "$4" "${5:+$(printf '%.2f' "$(echo "$3 / $5" | bc -l)")}"
}
row "Belady's MIN (offline)" "$(field belady_origin_bytes)" "$best" "$CACHE_MB"
row "LRU (simulated)" "$(field lru_origin_bytes)" "$(field lru_byte_hit_ratio)" "$CACHE_MB"
while read -r mb obytes; do
  row "LRU (simulated) at ${mb} MiB" "$obytes" "$(echo "1 - $obytes / $client_bytes" | bc -l)" "$mb"
done < <(python3 -c "import json,sys; [print(int(k) >> 20, v) for k, v in json.load(open(sys.argv[1]))['lru_at'].items()]" "$work/limits.json")
for s in $SYSTEMS; do
  read -r _ _ _ _ obytes held_avg held_max <<<"${R[$s]}"
  held=$CACHE_MB
  [ -z "${MIN_AT[$held_avg]:-}" ] || held=$held_avg
  min_held=${MIN_AT[$held]}
  [[ $s != cdn-edge+disk:* ]] || min_held="" # memory and disk: more than it held in memory
  row "$s" "$obytes" "$(echo "1 - $obytes / $client_bytes" | bc -l)" "$held_avg/$held_max" "$min_held"
done
echo "(client bytes $client_bytes in $requests requests; \"of optimum\": hit ratio / MIN's at"
echo " $CACHE_MB MiB; \"of MIN held\": hit ratio / MIN's at the size the cache held on average,"
echo " where that was more than $CACHE_MB MiB, else at $CACHE_MB MiB:"
for mb in "${!MIN_AT[@]}"; do printf ' MIN at %d MiB %.3f;' "$mb" "${MIN_AT[$mb]}"; done
echo ")"
