#!/usr/bin/env bash
# Many slow clients: cdn-edge and nginx each hold CONNS connections that read 4 MiB
# ranges of a warm object at a player's pace, while a probe times fresh requests. Per
# system: connections held, the rate achieved against the rate asked, RSS idle and under
# load and per connection, the server's CPU, and the probe's time to first byte.
#
# Usage: [CONNS=10000] [RATE_KBPS=625] [RANGE=4MiB] [SECS=60] [SEED=1] \
#        [SYSTEMS="cdn-edge nginx"] [RUNS=1] [RAMP_SECS=20] [SETTLE_SECS=5] \
#        [PROBE_PER_SEC=20] [PROBE_RANGE=64KiB] [RCVBUF=32768] [OBJECT_MB=256] \
#        [CACHE_MB=1024] [EDGE_LIMITS=] [SERVER_CPU=0] [LOAD_CPU=1] [QUIET_WAIT=60] \
#        [NETNS=1] [TCP_WMEM_MAX=65536] [LO_MTU=1500] [BUILD=1] \
#        bench/slow-clients.sh
#
#   CONNS        connections held (each one reads one range after another)
#   RATE_KBPS    each connection's read rate in kB/s (1,000 bytes): 625 = 5 Mbit/s
#   RANGE        bytes per request: a number, or with KiB or MiB (4MiB)
#   SECS         seconds of the steady period measured, after the ramp and settling
#   SEED         the ranges' seed: the same seed asks for the same ranges
#   SYSTEMS      which servers, in this order: cdn-edge, nginx
#   RUNS         runs of every system (interleaved); tables give the median and range
#   RAMP_SECS    connections are opened evenly over this time (CONNS/RAMP_SECS a second)
#   SETTLE_SECS  then this long before the steady period starts
#   PROBE_PER_SEC  fresh connections a second opened by the probe during the steady
#                period (for SECS - 5 s), each asking for PROBE_RANGE at a random offset
#   PROBE_RANGE  the probe's range (64KiB)
#   RCVBUF       SO_RCVBUF of each held connection, set before connect (the kernel
#                doubles it): small, so the pace reaches the server as a full socket.
#                With 16 KiB the window closes between reads, and the kernel's
#                zero-window probes, not the servers, held 10,000 x 25 kB/s to 70-118
#                MB/s; with 32 KiB, 10,000 connections take 61% of tcp_mem's maximum
#   OBJECT_MB    size of the one object (deterministic bytes), warmed into each server
#   CACHE_MB     cdn-edge memory tier and nginx proxy_cache max_size (tmpfs)
#   EDGE_LIMITS  extra lines for cdn-edge's [limits] (e.g. "max_pinned_bytes = 1073741824")
#   SERVER_CPU   the core the server under test is pinned to (one worker: cdn-edge
#                threads = 1, nginx worker_processes 1)
#   LOAD_CPU     the core of the load generator, the probe, the origin and this script
#   QUIET_WAIT   before each run, wait up to this many seconds for the machine's cores to
#                be under 15% busy (other work on a shared machine); 0: do not wait
#   NETNS        1: the run happens in a network namespace of its own (unshare --net, as
#                root), with its own loopback and TCP buffer settings; 0: in this
#                machine's namespace, with its settings (TCP_WMEM_MAX and LO_MTU unused)
#   TCP_WMEM_MAX the namespace's net.ipv4.tcp_wmem maximum, the most the kernel's send
#                buffer autotuning gives a socket. Left at the usual 4 MiB, every server
#                socket's send buffer grows to about 1.5 MB on loopback, and 10,000 of
#                them (with the clients' receive buffers, also on this machine) fill
#                net.ipv4.tcp_mem, which is the machine's, shared by every namespace:
#                then no socket gets memory, fresh connections included, whatever the
#                server does. 64 KiB keeps 10,000 connections under it.
#   LO_MTU       the namespace's loopback MTU: 1500, as on Ethernet. With the usual 65,536
#                a 64 KiB send buffer holds a single segment, and delayed ACKs slow a
#                connection to about 1.6 MB/s
#   BUILD        1: cargo build --release (cdn-edge and examples/slow_clients) first;
#                0: use target/release as it is
#
# Each system starts with an empty cache, gets the whole object through it once (the
# warm-up, checked to be a hit afterwards), and is sampled idle. Then the generator
# (examples/slow_clients.rs, `hold`) ramps up, and during the steady period this
# script samples from /proc the server's RSS every second (VmRSS, and RssAnon, its
# private memory: cdn-edge's memory tier is a shared memfd that VmRSS counts as its
# pages are touched), its CPU time (user + system of all its processes), the time its
# threads were runnable but waited for a cpu (schedstat: other work on its core), the
# kernel's TCP memory (/proc/net/sockstat), and runs the probe (`probe`, at nice -5 so
# the generator's core does not delay it). Per connection is the private RSS under load
# less idle, over the connections held. cdn-edge gets [limits] max_connections and
# max_connections_per_ip of CONNS + 1,000: every client here is 127.0.0.1; nginx gets
# worker_connections to match and open_file_cache (as in bench/compare.sh). Everything
# listens on 127.0.0.1:18100-18103; servers are stopped and temp dirs removed at exit.
# Needs root for NETNS=1, nice -5 and the open-file limit, and taskset (util-linux);
# installs nginx if missing.
set -euo pipefail
script=$(realpath "$0")
cd "$(dirname "$script")/.."

CONNS=${CONNS:-10000}
RATE_KBPS=${RATE_KBPS:-625}
RANGE=${RANGE:-4MiB}
SECS=${SECS:-60}
SEED=${SEED:-1}
SYSTEMS=${SYSTEMS:-cdn-edge nginx}
RUNS=${RUNS:-1}
RAMP_SECS=${RAMP_SECS:-20}
SETTLE_SECS=${SETTLE_SECS:-5}
PROBE_PER_SEC=${PROBE_PER_SEC:-20}
PROBE_RANGE=${PROBE_RANGE:-64KiB}
RCVBUF=${RCVBUF:-32768}
OBJECT_MB=${OBJECT_MB:-256}
CACHE_MB=${CACHE_MB:-1024}
EDGE_LIMITS=${EDGE_LIMITS:-}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BUILD=${BUILD:-1}
QUIET_WAIT=${QUIET_WAIT:-60}
NETNS=${NETNS:-1}
TCP_WMEM_MAX=${TCP_WMEM_MAX:-65536}
LO_MTU=${LO_MTU:-1500}

usage_error() { echo "slow-clients: $*" >&2; exit 2; }
bytes_of() { # 4MiB, 64KiB or a number of bytes
  case $1 in
    *MiB) echo $((${1%MiB} * 1048576)) ;;
    *KiB) echo $((${1%KiB} * 1024)) ;;
    *) echo "$1" ;;
  esac
}
for n in "$CONNS" "$RATE_KBPS" "$SECS" "$SEED" "$RUNS" "$RAMP_SECS" "$PROBE_PER_SEC" "$RCVBUF" \
  "$OBJECT_MB" "$CACHE_MB"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage_error "CONNS, RATE_KBPS, SECS, SEED, RUNS, RAMP_SECS, PROBE_PER_SEC, RCVBUF, OBJECT_MB, CACHE_MB: positive integers"
done
[[ "$SETTLE_SECS" =~ ^[0-9]+$ ]] || usage_error "SETTLE_SECS: a number of seconds"
[[ "$QUIET_WAIT" =~ ^[0-9]+$ ]] || usage_error "QUIET_WAIT: a number of seconds"
case "$NETNS" in 0 | 1) ;; *) usage_error "NETNS must be 0 or 1" ;; esac
[[ "$TCP_WMEM_MAX" =~ ^[1-9][0-9]*$ ]] || usage_error "TCP_WMEM_MAX: bytes"
[[ "$LO_MTU" =~ ^[1-9][0-9]*$ ]] || usage_error "LO_MTU: a loopback MTU"
[[ "$RANGE" =~ ^[1-9][0-9]*(KiB|MiB)?$ ]] || usage_error "RANGE: bytes, or a number with KiB or MiB"
[[ "$PROBE_RANGE" =~ ^[1-9][0-9]*(KiB|MiB)?$ ]] || usage_error "PROBE_RANGE: bytes, or a number with KiB or MiB"
[ "$SECS" -gt 5 ] || usage_error "SECS must be over 5 (the probe runs SECS - 5 s)"
for s in $SYSTEMS; do
  case $s in cdn-edge | nginx) ;; *) usage_error "SYSTEMS: cdn-edge, nginx" ;; esac
done
for c in "$SERVER_CPU" "$LOAD_CPU"; do [[ "$c" =~ ^[0-9]+$ ]] || usage_error "SERVER_CPU, LOAD_CPU: cpu numbers"; done
[ "$SERVER_CPU" != "$LOAD_CPU" ] || usage_error "SERVER_CPU and LOAD_CPU must differ"
command -v taskset >/dev/null || usage_error "taskset (util-linux) is needed"
range_bytes=$(bytes_of "$RANGE") probe_bytes=$(bytes_of "$PROBE_RANGE")
size=$((OBJECT_MB * 1048576))
[ "$range_bytes" -le "$size" ] || usage_error "RANGE must fit in OBJECT_MB"
[ "$probe_bytes" -le "$size" ] || usage_error "PROBE_RANGE must fit in OBJECT_MB"
[ "$CACHE_MB" -gt "$OBJECT_MB" ] || usage_error "CACHE_MB must be larger than OBJECT_MB (the object is kept warm)"

ORIGIN=127.0.0.1:18100 EDGE=127.0.0.1:18101 EDGE_ADMIN=127.0.0.1:18102 NGINX=127.0.0.1:18103
SECRET=slow-clients-secret-5b1e
bin=target/release/cdn-edge gen=target/release/examples/slow_clients
die() { echo "slow-clients: $*" >&2; exit 1; }
# shellcheck source=bench/lib/peers.sh
. bench/lib/peers.sh

# ---------------------------------------------------------------- tools, then the namespace
# Installing and building need the machine's network; the run itself, with NETNS=1, goes
# on in a network namespace of its own, entered by running this script again in it.
if [ -z "${SLOW_CLIENTS_NETNS:-}" ]; then
  work=$(mktemp -d /tmp/cdn-slow-clients.XXXXXX)
  trap 'peers_restore_policy; rm -rf "$work"' EXIT
  peers_install nginx curl
  if [ "$BUILD" = 1 ]; then
    timeout 3600 cargo build --release --quiet --bin cdn-edge --example slow_clients
  fi
  rm -rf "$work"
  trap - EXIT
  if [ "$NETNS" = 1 ]; then
    command -v ip >/dev/null || die "NETNS=1 needs ip (iproute2); NETNS=0 runs in this namespace"
    unshare --net true 2>/dev/null ||
      die "NETNS=1 needs unshare --net (util-linux, as root); NETNS=0 runs in this namespace"
    # net.ipv4.tcp_mem is the machine's, and cannot be read from inside the namespace.
    exec unshare --net -- env SLOW_CLIENTS_NETNS=1 SLOW_CLIENTS_TCP_MEM="$(cat /proc/sys/net/ipv4/tcp_mem)" \
      bash "$script"
  fi
else
  ip link set lo up mtu "$LO_MTU" || die "cannot bring up the namespace's loopback"
  read -r wmem_min wmem_default _ </proc/sys/net/ipv4/tcp_wmem
  echo "$wmem_min $wmem_default $TCP_WMEM_MAX" >/proc/sys/net/ipv4/tcp_wmem ||
    die "cannot set the namespace's net.ipv4.tcp_wmem"
fi
tcp_mem=${SLOW_CLIENTS_TCP_MEM:-$(cat /proc/sys/net/ipv4/tcp_mem)}

work=$(mktemp -d /tmp/cdn-slow-clients.XXXXXX)
shm=$(mktemp -d /dev/shm/cdn-slow-clients.XXXXXX)
mkdir -p "$work"/{origin,tmp}
pids=()   # "pid:signal" of the system under test
origin_pid="" gen_pid="" probe_pid=""
stop_system() {
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do peers_stop "${pids[i]%%:*}" "${pids[i]##*:}"; done
  pids=()
}
cleanup() {
  local rc=$?
  set +e
  peers_restore_policy
  [ -z "$probe_pid" ] || peers_stop "$probe_pid" TERM
  [ -z "$gen_pid" ] || peers_stop "$gen_pid" TERM
  stop_system
  [ -z "$origin_pid" ] || peers_stop "$origin_pid" TERM
  rm -rf "$work" "$shm"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ -x "$bin" ] || die "$bin is missing: cargo build --release"
[ -x "$gen" ] || die "$gen is missing: cargo build --release --example slow_clients"
for p in 18100 18101 18102 18103; do
  [ -z "$(ss -Hltn "sport = :$p")" ] || die "127.0.0.1:$p is in use; this script needs 18100-18103"
done
# Room for every connection in the servers and the generator (root may raise the hard
# limit; otherwise the current one must do).
need_files=$((CONNS * 2 + 4096))
if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$need_files" ]; then
  ulimit -Hn "$need_files" 2>/dev/null || true
fi
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -gt $((CONNS + 1024)) ] ||
  die "the open-file limit ($(ulimit -n)) is too low for CONNS=$CONNS: run as root or raise it"
nice_probe=()
[ "$(id -u)" = 0 ] && nice_probe=(nice -n -5)
# This script, curl and the origin run on the load's core: the server's core runs only
# the server (and the kernel's work for its sockets).
taskset -cp "$LOAD_CPU" $$ >/dev/null

echo "== machine"
echo "cpus:      $(nproc --all) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), kernel $(uname -r)"
echo "memory:    $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "nginx:     $(/usr/sbin/nginx -v 2>&1 | sed 's/^nginx version: //')"
echo "cdn-edge:  $("$bin" --version | awk '{print $2}'), commit $(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
echo "date:      $(date -u +%FT%TZ), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "setup:     server on cpu $SERVER_CPU (one worker), generator, probe and origin on cpu $LOAD_CPU"
echo "load:      $CONNS connections x $RATE_KBPS kB/s = $((CONNS * RATE_KBPS / 1000)) MB/s asked; $RANGE ranges of a $OBJECT_MB MiB object, seed $SEED"
echo "           ramp ${RAMP_SECS}s, settle ${SETTLE_SECS}s, steady ${SECS}s; SO_RCVBUF $RCVBUF"
echo "kernel:    net.ipv4.tcp_mem $(tr '\t' ' ' <<<"$tcp_mem") pages (pressure from the second, none beyond the third), tcp_wmem $(tr '\t' ' ' </proc/sys/net/ipv4/tcp_wmem)"
if [ "$NETNS" = 0 ]; then
  echo "network:   this machine's namespace and loopback (MTU $(cat /sys/class/net/lo/mtu))"
else
  echo "network:   a network namespace of its own: loopback MTU $LO_MTU, tcp_wmem max $TCP_WMEM_MAX"
fi
echo "probe:     $PROBE_PER_SEC fresh connections/s for $((SECS - 5)) s, $PROBE_RANGE each"
echo

# ---------------------------------------------------------------- origin
(
  set +o pipefail
  openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f \
    -iv 00000000000000000000000000000000 -in /dev/zero 2>/dev/null | head -c "$size" >"$work/origin/object.bin"
)
[ "$(stat -c %s "$work/origin/object.bin")" = "$size" ] || die "could not write the origin object"
peers_nginx_paths "$work"
cat >"$work/origin.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
pid $work/origin.pid;
error_log $work/origin-error.log warn;
events { worker_connections 1024; }
http {
  $temp_paths
  access_log off;
  sendfile on;
  keepalive_requests 100000;
  server {
    listen $ORIGIN;
$(peers_origin_object "$work/origin")
    location / { return 404; }
  }
}
EOF
/usr/sbin/nginx -p "$work/" -e "$work/origin-error.log" -c "$work/origin.conf" &
origin_pid=$!
peers_wait_http origin "http://$ORIGIN/"

# ---------------------------------------------------------------- systems
cat >"$work/edge.toml" <<EOF
$(peers_edge_head "$EDGE" "$EDGE_ADMIN" "$SECRET")

[cache]
slice_bytes = 1048576
memory_bytes = $((CACHE_MB * 1048576))

[origin]
urls = ["http://$ORIGIN"]
path = "/objects/{o}/{v}"

[server]
threads = 1
$(peers_edge_quick_stop "$work")

[limits]
max_connections = $((CONNS + 1000))
max_connections_per_ip = $((CONNS + 1000))
$EDGE_LIMITS

[log]
access = false
EOF
"$bin" check-config "$work/edge.toml" >/dev/null || die "cdn-edge refuses its config: $work/edge.toml"
edge_query=$("$bin" sign --conf "$work/edge.toml" --key k1 --object movie --version v1 --ttl 86400)

# A socket per connection, and cache files kept open by open_file_cache; no more than
# this shell may give (a worker cannot raise its hard limit without CAP_SYS_RESOURCE).
nginx_files=$((CONNS * 2 + 4096))
[ "$(ulimit -Hn)" = unlimited ] || [ "$nginx_files" -le "$(ulimit -Hn)" ] || nginx_files=$(ulimit -Hn)
cat >"$work/nginx-edge.conf" <<EOF
$user_line
worker_processes 1;
worker_rlimit_nofile $nginx_files;
daemon off;
pid $work/nginx-edge.pid;
error_log $work/nginx-edge-error.log warn;
events { worker_connections $((CONNS + 2048)); }
http {
  $temp_paths
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  open_file_cache max=10000 inactive=60s;   # cached slice files opened once, as in compare.sh
  open_file_cache_valid 60s;
  proxy_cache_path $shm/video levels=1:2 keys_zone=video:64m max_size=${CACHE_MB}m inactive=1d use_temp_path=off;
  upstream origin { server $ORIGIN; keepalive 64; }
  server {
    listen $NGINX backlog=4096;
    location ~ ^/objects/[^/]+/[^/]+\$ {
$(peers_nginx_slices)
      add_header Cache-Status \$upstream_cache_status;
    }
    location / { return 404; }
  }
}
EOF

start_system() { # name: start it, empty; sets server_pid, url, hit_pattern
  case $1 in
    cdn-edge)
      taskset -c "$SERVER_CPU" "$bin" serve --conf "$work/edge.toml" >"$work/cdn-edge.log" 2>&1 &
      server_pid=$!
      pids+=("$server_pid:INT")
      peers_wait_http cdn-edge "http://$EDGE_ADMIN/healthz"
      addr=$EDGE path="/?$edge_query" hit_pattern='cdn-edge; hit'
      ;;
    nginx)
      rm -rf "${shm:?}/video" && mkdir -p "$shm/video"
      taskset -c "$SERVER_CPU" /usr/sbin/nginx -p "$work/" -e "$work/nginx-edge-error.log" -c "$work/nginx-edge.conf" &
      server_pid=$!
      pids+=("$server_pid:TERM")
      peers_wait_http nginx "http://$NGINX/"
      addr=$NGINX path="/objects/movie/v1" hit_pattern='HIT'
      ;;
  esac
}

server_procs() { # the server's processes: the main one and its children (nginx's worker)
  local k=()
  read -ra k 2>/dev/null <"/proc/$server_pid/task/$server_pid/children" || true
  echo "$server_pid" "${k[@]}"
}
rss_kib() { # VmRSS and RssAnon (private memory) of the server's processes, summed
  local p total=0 anon=0 t a
  for p in $(server_procs); do
    read -r t a < <(awk '/^VmRSS:/ { t = $2 } /^RssAnon:/ { a = $2 } END { print t + 0, a + 0 }' \
      "/proc/$p/status" 2>/dev/null || echo 0 0)
    total=$((total + t)) anon=$((anon + a))
  done
  echo "$total $anon"
}
cpu_ticks() { # user + system ticks of the server's processes (all their threads)
  local p total=0 s
  for p in $(server_procs); do
    s=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)
    total=$((total + s))
  done
  echo "$total"
}
wait_ns() { # ns the server's threads have spent runnable but waiting for a cpu (schedstat)
  local p total=0 f w
  for p in $(server_procs); do
    for f in /proc/"$p"/task/*/schedstat; do
      read -r _ w _ <"$f" 2>/dev/null || continue
      total=$((total + w))
    done
  done
  echo "$total"
}
pressures() { # times TCP memory pressure began (TcpExt TCPMemoryPressures, this namespace)
  awk '/^TcpExt:/ { if (!h) { split($0, n); h = 1 } else { split($0, v); for (i in n) if (n[i] == "TCPMemoryPressures") print v[i] } }' /proc/net/netstat
}
quiet_wait() { # up to QUIET_WAIT s for both cores to be mostly idle (other work on the machine)
  local a b t0 t1 n
  for ((n = 0; n < QUIET_WAIT; n++)); do
    read -r a t0 < <(awk '$1 == "cpu" { b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6 }' /proc/stat)
    sleep 1
    read -r b t1 < <(awk '$1 == "cpu" { b = $2 + $3 + $4 + $7 + $8 + $9; print b, b + $5 + $6 }' /proc/stat)
    [ $(((b - a) * 100)) -lt $(((t1 - t0) * 15)) ] && return 0
  done
  echo "          (the cores did not go quiet within ${QUIET_WAIT}s: other work on the machine)"
}
tcp_mem_kib() { awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) * 4 }' /proc/net/sockstat; }
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

warm() { # name: the whole object through the server, then a range must be a hit
  local status
  status=$(curl -sS -o /dev/null -w '%{http_code}' -m 120 "http://$addr$path" 2>&1) ||
    die "$1: the warm-up failed: $status; $(tail -3 "$work/$1.log" 2>/dev/null)"
  [ "$status" = 200 ] || die "$1: the warm-up answered $status"
  local h
  h=$(curl -s -D - -o /dev/null -m 10 -H "Range: bytes=1000-2000000" "http://$addr$path")
  grep -qi "^cache-status: .*$hit_pattern" <<<"$h" || die "$1: not a hit after the warm-up: $h"
}

tick_hz=$(getconf CLK_TCK)
probe_field() { sed -E "s/.* $1=([0-9.]+).*/\1/" <<<"$probe_line"; }
declare -A R # "system run" -> figures
run_system() { # name run
  local s=$1 run=$2
  quiet_wait
  start_system "$s"
  warm "$s"
  sleep 2
  local rss_idle anon_idle
  read -r rss_idle anon_idle < <(rss_kib)
  local tcp_idle
  tcp_idle=$(tcp_mem_kib)
  local log=$work/hold-$s-$run.log
  taskset -c "$LOAD_CPU" "$gen" hold --addr "$addr" --path "$path" --size "$size" --conns "$CONNS" \
    --rate-kbps "$RATE_KBPS" --range-bytes "$range_bytes" --ramp-secs "$RAMP_SECS" \
    --settle-secs "$SETTLE_SECS" --secs "$SECS" --seed "$SEED" --rcvbuf "$RCVBUF" >"$log" 2>&1 &
  gen_pid=$!
  local limit=$((RAMP_SECS + SETTLE_SECS + 60))
  for ((i = 0; i < limit * 10; i++)); do
    grep -q '^STEADY' "$log" && break
    kill -0 "$gen_pid" 2>/dev/null || die "$s: the generator stopped: $(tail -5 "$log")"
    sleep 0.1
  done
  grep -q '^STEADY' "$log" || die "$s: the generator did not reach its steady period"
  local c0 c1 p0 p1 w0 w1
  c0=$(cpu_ticks) p0=$(pressures) w0=$(wait_ns)
  taskset -c "$LOAD_CPU" "${nice_probe[@]}" "$gen" probe --addr "$addr" --path "$path" --size "$size" \
    --per-sec "$PROBE_PER_SEC" --secs $((SECS - 5)) --range-bytes "$probe_bytes" --seed "$SEED" \
    >"$work/probe-$s-$run.log" 2>&1 &
  probe_pid=$!
  local rss_samples="" anon_samples="" tcp_samples="" r a
  for ((i = 0; i < (SECS + 30) * 10; i++)); do
    grep -q '^END' "$log" && break
    if ((i % 10 == 5)); then
      read -r r a < <(rss_kib)
      rss_samples+=" $r" anon_samples+=" $a"
      tcp_samples+=" $(tcp_mem_kib)"
    fi
    sleep 0.1
  done
  c1=$(cpu_ticks) p1=$(pressures) w1=$(wait_ns)
  grep -q '^END' "$log" || die "$s: the generator did not end its steady period"
  wait "$gen_pid" || true
  gen_pid=""
  wait "$probe_pid" || true
  probe_pid=""
  local server_log=$work/nginx-edge-error.log
  [ "$s" = cdn-edge ] && server_log=$work/cdn-edge.log
  local log_lines
  log_lines=$(grep -Ei 'warn|error|crit|alert' "$server_log" | sed -E 's/^[0-9/]+ [0-9:]+ //; s/"timestamp":"[^"]*",//' |
    sort | uniq -c | sort -rn | head -5 || true)
  local metrics=""
  if [ "$s" = cdn-edge ]; then
    metrics=$(curl -s -m 5 "http://$EDGE_ADMIN/metrics" | grep -E '^cdn_edge_(client_refusals_total|client_slow_sends_total|client_timeouts_total|stream_aborts)' | grep -v ' 0$' || true)
  fi
  stop_system
  local end_line probe_line
  end_line=$(grep '^END' "$log")
  probe_line=$(grep '^PROBE' "$work/probe-$s-$run.log" || echo "PROBE failed: $(tail -3 "$work/probe-$s-$run.log")")
  local held steady_bytes steady_secs errors
  held=$(sed -E 's/.* held=([0-9]+).*/\1/' <<<"$end_line")
  steady_bytes=$(sed -E 's/.*steady_bytes=([0-9]+).*/\1/' <<<"$end_line")
  steady_secs=$(sed -E 's/.*steady_secs=([0-9.]+).*/\1/' <<<"$end_line")
  errors=$(sed -E 's/.* errors=([0-9]+).*/\1/' <<<"$end_line")
  local rss_load anon_load tcp_load
  rss_load=$(median <<<"$rss_samples")
  anon_load=$(median <<<"$anon_samples")
  tcp_load=$(median <<<"$tcp_samples")
  local mbps cpu_pct ms_per_mb per_conn
  mbps=$(awk -v b="$steady_bytes" -v t="$steady_secs" 'BEGIN { printf "%.1f", b / t / 1e6 }')
  cpu_pct=$(awk -v d=$((c1 - c0)) -v hz="$tick_hz" -v t="$steady_secs" 'BEGIN { printf "%.1f", 100 * d / hz / t }')
  ms_per_mb=$(awk -v d=$((c1 - c0)) -v hz="$tick_hz" -v b="$steady_bytes" 'BEGIN { printf "%.3f", b ? 1000 * d / hz / (b / 1e6) : 0 }')
  local gen_pct pressure_pct wait_pct
  wait_pct=$(awk -v d=$((w1 - w0)) -v t="$steady_secs" 'BEGIN { printf "%.1f", d / 1e7 / t }')
  gen_pct=$(awk -v c="$(sed -E 's/.*steady_cpu_secs=([0-9.]+).*/\1/' <<<"$end_line")" -v t="$steady_secs" \
    'BEGIN { printf "%.1f", 100 * c / t }')
  pressure_pct=$((p1 - p0))
  local tcp_pct
  tcp_pct=$(awk -v m="$tcp_load" -v l="$tcp_mem" 'BEGIN { split(l, x, " "); printf "%.0f", 100 * m / 4 / x[3] }')
  per_conn=$(awk -v l="$anon_load" -v i="$anon_idle" -v n="$held" 'BEGIN { printf "%.1f", n ? (l - i) / n : 0 }')
  R["$s $run"]="$held $mbps $rss_idle $rss_load $per_conn $cpu_pct - $ms_per_mb $(probe_field ttfb_p50_ms) $(probe_field ttfb_p99_ms) $(probe_field ttfb_max_ms) $(probe_field ok) $(probe_field errors) $errors $tcp_idle $tcp_load $anon_idle $anon_load $gen_pct $pressure_pct $tcp_pct $wait_pct"
  printf '%-9s run %d: held %s of %s; %s MB/s of %s asked; RSS %s -> %s KiB, private %s -> %s KiB (%s KiB/conn); cpu %s%% (runnable, waiting for a cpu %s%%), %s ms/MB; probe %s\n' \
    "$s" "$run" "$held" "$CONNS" "$mbps" "$((CONNS * RATE_KBPS / 1000))" "$rss_idle" "$rss_load" "$anon_idle" "$anon_load" "$per_conn" \
    "$cpu_pct" "$wait_pct" "$ms_per_mb" "${probe_line#PROBE }"
  printf '          generator errors %s, cpu %s%%; kernel TCP memory %s -> %s KiB (%s%% of tcp_mem max), pressure began %s times\n' \
    "$errors" "$gen_pct" "$tcp_idle" "$tcp_load" "$tcp_pct" "$pressure_pct"
  grep '^ERRORS' "$log" | sed 's/^/          generator /' | head -10 || true
  grep '^ERRORS' "$work/probe-$s-$run.log" | sed 's/^/          probe /' | head -10 || true
  [ -z "$metrics" ] || while read -r m; do echo "          edge metric $m"; done <<<"$metrics"
  [ -z "$log_lines" ] || while read -r m; do echo "          $s log: $m"; done <<<"$log_lines"
}

for ((run = 1; run <= RUNS; run++)); do
  for s in $SYSTEMS; do run_system "$s" "$run"; done
done
peers_stop "$origin_pid" TERM
origin_pid=""

echo
echo "== many slow clients: $CONNS x $RATE_KBPS kB/s ($((CONNS * RATE_KBPS / 1000)) MB/s asked), $RANGE ranges, seed $SEED; median of $RUNS run(s) (lowest-highest)"
col() { # system field-index: "median (min-max)" over runs
  local vals="" r v
  for ((r = 1; r <= RUNS; r++)); do
    read -ra v <<<"${R["$1 $r"]}"
    vals+=" ${v[$2]}"
  done
  local m lo hi
  m=$(median <<<"$vals")
  lo=$(tr ' ' '\n' <<<"$vals" | grep -v '^$' | sort -g | head -1)
  hi=$(tr ' ' '\n' <<<"$vals" | grep -v '^$' | sort -g | tail -1)
  if [ "$RUNS" = 1 ]; then echo "$m"; else echo "$m ($lo-$hi)"; fi
}
for s in $SYSTEMS; do
  echo
  echo "-- $s"
  printf '  %-34s %s\n' "connections held" "$(col "$s" 0) of $CONNS"
  printf '  %-34s %s\n' "rate achieved, MB/s" "$(col "$s" 1) of $((CONNS * RATE_KBPS / 1000)) asked"
  printf '  %-34s %s\n' "RSS idle (warm), KiB" "$(col "$s" 2)"
  printf '  %-34s %s\n' "RSS under load, KiB" "$(col "$s" 3)"
  printf '  %-34s %s\n' "private RSS idle, KiB" "$(col "$s" 16)"
  printf '  %-34s %s\n' "private RSS under load, KiB" "$(col "$s" 17)"
  printf '  %-34s %s\n' "private RSS per connection, KiB" "$(col "$s" 4)"
  printf '  %-34s %s\n' "server CPU, % of a core" "$(col "$s" 5)"
  printf '  %-34s %s\n' "server runnable, waiting for a cpu, %" "$(col "$s" 21)"
  printf '  %-34s %s\n' "server CPU per MB sent, ms" "$(col "$s" 7)"
  printf '  %-34s %s / %s / %s\n' "probe TTFB p50 / p99 / max, ms" "$(col "$s" 8)" "$(col "$s" 9)" "$(col "$s" 10)"
  printf '  %-34s %s ok, %s errors\n' "probe requests" "$(col "$s" 11)" "$(col "$s" 12)"
  printf '  %-34s %s\n' "generator errors" "$(col "$s" 13)"
  printf '  %-34s %s -> %s\n' "kernel TCP memory, KiB" "$(col "$s" 14)" "$(col "$s" 15)"
  printf '  %-34s %s\n' "kernel TCP memory, % of tcp_mem max" "$(col "$s" 20)"
  printf '  %-34s %s\n' "TCP memory pressure began, times" "$(col "$s" 19)"
  printf '  %-34s %s\n' "generator CPU, % of its core" "$(col "$s" 18)"
done
