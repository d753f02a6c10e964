#!/usr/bin/env bash
# Side-by-side load test of cdn-edge, nginx and Varnish as video edges, on this machine,
# in one run, against one shared origin. By default each server gets one core and one
# worker, and the load generator the other core: the figure to compare is the server's
# own CPU time per request.
#
# Usage: [PIN=1] [SERVER_CPU=0] [LOAD_CPU=1] [SECS=10] [RUNS=1] [CONNS=32] [ACCESS_LOG=off|on] \
#        [CACHE_MB=2048] [STORAGE=memory] [DISK_DIR=/var/tmp] [BUILD=1] [SHOW_CONFIG=0] \
#        [QUIET_WAIT=60] [EDGE_THREADS] \
#        [EDGE_SENDFILE=true] [WRK_THREADS] [SHMEM_HUGE] bench/compare.sh
#
#   PIN         1 (default): every server under test runs on core SERVER_CPU with one
#               worker (cdn-edge threads = 1, nginx worker_processes 1, Varnish one thread
#               pool), started with taskset -c so all its threads and processes inherit it;
#               wrk (one thread), the storm's curl, the origin nginx and this script run on
#               core LOAD_CPU. 0: nothing pinned, the servers' own worker defaults (as
#               before pinning existed); EDGE_THREADS and WRK_THREADS apply.
#   SERVER_CPU  the servers' core with PIN=1 (default 0)
#   LOAD_CPU    the load's core with PIN=1 (default 1; not SERVER_CPU)
#   SECS        seconds per wrk run                        RUNS      repeats of every workload
#   CONNS       wrk connections                            CACHE_MB  memory cache of each edge
#   STORAGE     memory (default): every cache in RAM (cdn-edge memory tier, nginx
#               proxy_cache on tmpfs, Varnish malloc). disk: the object is three times
#               cdn-edge's memory tier (memory_bytes = a third of it) and every cache keeps
#               it on DISK_DIR's file system: cdn-edge's disk tier, nginx proxy_cache
#               there, Varnish -s file there; CACHE_MB is then each one's disk budget.
#               Files are read through the page cache, as in production with a hot set
#               smaller than RAM: this measures each server's cost of serving from disk
#               files, not the device.
#   DISK_DIR    where STORAGE=disk puts the caches (default /var/tmp; not a tmpfs)
#   ACCESS_LOG  off: no access log anywhere; on: buffered access log on all three
#               (nginx buffer=64k flush=1s, cdn-edge's log thread, varnishncsa, which counts
#               as Varnish's cpu and runs on its core)
#   BUILD       1: cargo build --release first; 0: use target/release/cdn-edge as it is
#   SHOW_CONFIG 1: print the generated origin, nginx, Varnish and cdn-edge configs
#   QUIET_WAIT  before each timed run, wait up to this many seconds (default 60) for the
#               cores to be idle; each run reports the cpu share other work took during it
#   EDGE_THREADS  cdn-edge [server] threads; PIN=1: 1 (the only value); PIN=0: default 0,
#               one per cpu, as nginx's worker_processes auto
#   EDGE_SENDFILE  cdn-edge cache.sendfile (default true: warm slices leave by sendfile
#               from its page pool; false: copied into the socket, as Varnish does). Over
#               TLS both edges copy through their TLS library.
#   WRK_THREADS wrk threads; PIN=1: 1 (the only value); PIN=0: default 1 (with one, wrk
#               itself limits range hits at about 3.5 GB/s on a 2-cpu machine)
#   SHMEM_HUGE  unset (default): the machine's shmem huge-page setting as it is. never,
#               within_size, always or advise (as root): for the run, the kernel's
#               shmem_enabled (which decides the pages of cdn-edge's page pool, a memfd) is
#               set to it and restored at exit, and with STORAGE=memory nginx's cache goes
#               on a tmpfs mounted with huge= the same, so both edges' cached slices get the
#               same pages
#
# What runs (everything on 127.0.0.1:18080-18087, in the foreground of this script, with
# config, pid, certificate and log files in a temp dir):
#   origin     nginx: a 256 MiB object (deterministic bytes) at /objects/{o}/{v} for any
#              o and v, with byte ranges; a 74-byte JSON at /base_dict_getHoverDict_8
#              (Cache-Control: max-age=86400). Its access log counts origin requests.
#   cdn-edge   slice 1 MiB, memory tier CACHE_MB, no disk tier, threads = EDGE_THREADS,
#              sendfile = EDGE_SENDFILE; HTTP and HTTPS (listen.https, [tls]).
#   nginx      secure_link (MD5 of expiry + URI + secret, 403/410), slice 1m, proxy_cache
#              on tmpfs with proxy_cache_lock, keepalive to the origin; one server
#              listening for HTTP and HTTPS (ssl_protocols TLSv1.3).
#   Varnish    malloc storage of CACHE_MB, builtin VCL (caches by URL), unsigned URLs;
#              HTTP only (Varnish Cache has no TLS).
#   TLS        one self-signed ECDSA P-256 certificate for 127.0.0.1 (openssl), used by
#              cdn-edge and nginx; both must negotiate the same protocol and cipher suite.
# Workloads (wrk -tWRK_THREADS -cCONNS -dSECS --latency, bench/wrk/compare.lua): random
# 310,491-byte range hits; the same over HTTPS (cdn-edge and nginx); dictionary hits;
# then a cold-miss storm: 100 concurrent requests (curl --parallel) for distinct ranges
# of a version no edge has cached, with the origin requests it caused. Every table starts
# with the server's cpu time per request, then req/s and p99: the median of RUNS runs with
# the lowest and highest beside it, and the ratio against cdn-edge; the other columns are
# medians. Each run's numbers are printed too. A run where wrk used >= 90% of its core
# while the server used < 90% of its own is marked load-bound (PIN=1); a run during which
# other work took over 5% of a core (PIN=0: of the cpus) is flagged as disturbed.
# Installs nginx, varnish and wrk from the distribution if missing (as root, with service
# start-up suppressed; services the install registered are stopped and disabled). Needs
# about 3 x CACHE_MB + 1 GiB of free memory, and taskset (util-linux) with PIN=1.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/lib/peers.sh
. bench/lib/peers.sh
started=$(date +%s)

usage_error() { echo "compare: $*" >&2; exit 2; }
PIN=${PIN:-1}
SERVER_CPU=${SERVER_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SECS=${SECS:-10}
RUNS=${RUNS:-1}
CONNS=${CONNS:-32}
ACCESS_LOG=${ACCESS_LOG:-off}
CACHE_MB=${CACHE_MB:-2048}
STORAGE=${STORAGE:-memory}
DISK_DIR=${DISK_DIR:-/var/tmp}
BUILD=${BUILD:-1}
SHOW_CONFIG=${SHOW_CONFIG:-0}
QUIET_WAIT=${QUIET_WAIT:-60}
EDGE_SENDFILE=${EDGE_SENDFILE:-true}
SHMEM_HUGE=${SHMEM_HUGE:-}
case "$PIN" in 0 | 1) ;; *) usage_error "PIN must be 0 or 1" ;; esac
if [ "$PIN" = 1 ]; then
  EDGE_THREADS=${EDGE_THREADS:-1} WRK_THREADS=${WRK_THREADS:-1}
  if [ "$EDGE_THREADS" != 1 ] || [ "$WRK_THREADS" != 1 ]; then
    usage_error "PIN=1 runs one worker per server and one wrk thread: EDGE_THREADS and WRK_THREADS apply with PIN=0"
  fi
  for c in "$SERVER_CPU" "$LOAD_CPU"; do
    [[ "$c" =~ ^[0-9]+$ ]] || usage_error "SERVER_CPU, LOAD_CPU: cpu numbers"
  done
  [ "$SERVER_CPU" != "$LOAD_CPU" ] || usage_error "SERVER_CPU and LOAD_CPU must differ"
  command -v taskset >/dev/null || usage_error "PIN=1 needs taskset (util-linux)"
  for c in "$SERVER_CPU" "$LOAD_CPU"; do
    taskset -c "$c" true 2>/dev/null || usage_error "cpu $c is not available here (this shell: $(taskset -cp $$))"
  done
else
  EDGE_THREADS=${EDGE_THREADS:-0} WRK_THREADS=${WRK_THREADS:-1}
fi
case "$STORAGE" in memory | disk) ;; *) usage_error "STORAGE must be memory or disk" ;; esac
if [ "$STORAGE" = disk ]; then
  if [ ! -d "$DISK_DIR" ] || [ ! -w "$DISK_DIR" ]; then usage_error "DISK_DIR $DISK_DIR: not a writable directory"; fi
  [ "$(stat -f -c %T "$DISK_DIR")" != tmpfs ] || usage_error "DISK_DIR $DISK_DIR is a tmpfs: STORAGE=disk wants a disk"
fi
case "$EDGE_SENDFILE" in true | false) ;; *) usage_error "EDGE_SENDFILE must be true or false" ;; esac
shmem_setting=/sys/kernel/mm/transparent_hugepage/shmem_enabled
case "$SHMEM_HUGE" in
  "") ;;
  never | within_size | always | advise)
    [ -w "$shmem_setting" ] || usage_error "SHMEM_HUGE needs root and $shmem_setting (a kernel with transparent huge pages)"
    ;;
  *) usage_error "SHMEM_HUGE must be never, within_size, always or advise" ;;
esac
case "$ACCESS_LOG" in on | off) ;; *) usage_error "ACCESS_LOG must be on or off" ;; esac
[[ "$WRK_THREADS" =~ ^[1-9][0-9]*$ ]] || usage_error "WRK_THREADS: a positive number"
[[ "$EDGE_THREADS" =~ ^[0-9]+$ ]] || usage_error "EDGE_THREADS: a number (0: one per cpu)"
[[ "$QUIET_WAIT" =~ ^[0-9]+$ ]] || usage_error "QUIET_WAIT: a number of seconds"
for n in "$SECS" "$RUNS" "$CONNS" "$CACHE_MB"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || usage_error "SECS, RUNS, CONNS, CACHE_MB: positive integers"
done

ncpus=$(nproc) # before this script pins itself: nproc counts the cpus it may run on
ORIGIN=127.0.0.1:18080 CDN=127.0.0.1:18081 CDN_ADMIN=127.0.0.1:18082
NGINX=127.0.0.1:18083 VARNISH=127.0.0.1:18084 VARNISH_ADMIN=127.0.0.1:18085
CDN_TLS=127.0.0.1:18086 NGINX_TLS=127.0.0.1:18087
SIZE=268435456 LEN=310491 SLICE=1048576 STORM=100
SECRET=compare-secret-3f1c OBJ=movie VER=v1
DICT_PATH=/base_dict_getHoverDict_8
DICT_URI="$DICT_PATH?form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n"
DICT_JSON='{"form":"어","lemma":"어","pos":"NOUN","sl":"ko","tl":"en","gloss":"uh"}'
bin=target/release/cdn-edge
lua=bench/wrk/compare.lua

# With PIN=1, programs are started through taskset: servers on SERVER_CPU, the rest on
# LOAD_CPU. With PIN=0 these are empty and programs start as they are.
on_server=() on_load=()
if [ "$PIN" = 1 ]; then on_server=(taskset -c "$SERVER_CPU") on_load=(taskset -c "$LOAD_CPU"); fi

work=$(mktemp -d /tmp/cdn-compare.XXXXXX)
if [ -d /dev/shm ] && [ -w /dev/shm ]; then shm=$(mktemp -d /dev/shm/cdn-compare.XXXXXX); else shm=$work/shm; fi
# Where the video caches live: tmpfs (memory) or DISK_DIR (disk).
if [ "$STORAGE" = disk ]; then store=$(mktemp -d "$DISK_DIR/cdn-compare.XXXXXX"); else store=$shm; fi
mkdir -p "$work"/{origin,tmp,storm,tls} "$shm"
pids=()            # daemons started here, stopped by pid at exit
bg_pid=""          # the wrk or curl running in the background, if any
shmem_saved=""     # shmem_enabled before SHMEM_HUGE changed it
shm_mounted=0      # 1 while $shm is a tmpfs mounted here
cleanup() {
  local rc=$?
  set +e
  peers_restore_policy
  [ -n "$bg_pid" ] && peers_stop "$bg_pid" TERM
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    # "pid:signal": cdn-edge stops at once on SIGINT, nginx and varnishd on SIGTERM
    peers_stop "${pids[i]%%:*}" "${pids[i]##*:}"
  done
  [ "$shm_mounted" = 1 ] && umount "$shm"
  [ -n "$shmem_saved" ] && echo "$shmem_saved" >"$shmem_setting"
  rm -rf "$work" "$shm" "$store"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# The bracketed choice of a sysfs setting such as "always within_size [never]".
selected() { sed -n 's/.*\[\(.*\)\].*/\1/p' "$1" 2>/dev/null; }
if [ -n "$SHMEM_HUGE" ]; then
  shmem_saved=$(selected "$shmem_setting")
  echo "$SHMEM_HUGE" >"$shmem_setting"
  if [ "$STORAGE" = memory ]; then
    mount -t tmpfs -o "huge=$SHMEM_HUGE,size=$((3 * CACHE_MB + 512))m" cdn-compare "$shm"
    shm_mounted=1
  fi
fi

die() { echo "compare: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
peers_install nginx varnish wrk
nginx_v=$(/usr/sbin/nginx -V 2>&1)
for m in http_slice_module http_secure_link_module http_ssl_module; do
  grep -q -- "--with-$m" <<<"$nginx_v" || die "this nginx lacks $m (nginx -V); Debian's nginx package has it"
done
command -v openssl >/dev/null || die "openssl is missing"
curl --help all 2>/dev/null | grep -q -- --parallel-immediate || die "curl >= 7.68 is needed (--parallel)"

if [ "$BUILD" = 1 ]; then timeout 3600 cargo build --release --quiet; fi
[ -x "$bin" ] || die "$bin is missing: cargo build --release"
# From here on this script, and so everything it starts without taskset (curl, openssl,
# the checks), runs on the load's core: the servers' core runs nothing but the servers.
if [ "$PIN" = 1 ]; then taskset -cp "$LOAD_CPU" $$ >/dev/null; fi

for p in 18080 18081 18082 18083 18084 18085 18086 18087; do
  [ -z "$(ss -Hltn "sport = :$p")" ] || die "127.0.0.1:$p is in use; this script needs 18080-18087"
done

# ---------------------------------------------------------------- machine
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src benches Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  commit="$commit (plus uncommitted changes in src/)"
fi
# shellcheck source=/dev/null
os_name=$(. /etc/os-release && echo "$PRETTY_NAME")
echo "== machine"
echo "cpus:      $ncpus ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
echo "memory:    $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "kernel:    $(uname -sr)"
echo "os:        $os_name"
echo "nginx:     $(/usr/sbin/nginx -v 2>&1 | sed 's/^nginx version: //') ($(dpkg-query -W -f='${Version}' nginx 2>/dev/null || echo '?'))"
echo "varnish:   $(/usr/sbin/varnishd -V 2>&1 | head -1 | sed 's/^varnishd (\(.*\))$/\1/')"
echo "wrk:       $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
echo "curl:      $(curl --version | head -1 | awk '{print $2}')"
echo "openssl:   $(openssl version | awk '{print $2}')"
echo "cdn-edge:  $("$bin" --version | awk '{print $2}'), commit $commit"
echo "date:      $(date -u +%FT%TZ)"
echo
echo "== setup"
if [ "$PIN" = 1 ]; then
  echo "pinning:    ON: each server under test on cpu $SERVER_CPU with one worker; wrk (one thread),"
  echo "            the storm's curl, the origin and this script on cpu $LOAD_CPU (taskset -c at launch)"
  echo "load:       wrk -t1 -c$CONNS -d${SECS}s --latency, $RUNS run(s), medians (lowest-highest)"
  echo "workers:    cdn-edge threads = 1, nginx worker_processes 1, Varnish -p thread_pools=1"
else
  echo "pinning:    OFF: wrk and the servers share the $ncpus cpus"
  echo "load:       wrk -t$WRK_THREADS -c$CONNS -d${SECS}s --latency, $RUNS run(s), medians (lowest-highest)"
  echo "workers:    cdn-edge $([ "$EDGE_THREADS" = 0 ] && echo "one thread per cpu ($ncpus)" || echo "$EDGE_THREADS thread(s)"), nginx one worker per cpu, Varnish its default pools"
fi
echo "sendfile:   cdn-edge $([ "$EDGE_SENDFILE" = true ] && echo "from its page pool (cache.sendfile = true)" || echo "off: copies into the socket"); nginx sendfile on (tmpfs cache); Varnish copies;"
echo "            over TLS both cdn-edge (rustls) and nginx (OpenSSL, no kTLS) copy through TLS"
if [ "$ACCESS_LOG" = on ]; then
  echo "access log: ON everywhere: nginx access_log buffer=64k flush=1s, cdn-edge [log] access = true"
  echo "            (its writer thread), Varnish varnishncsa -w; all to files in a temp dir"
else
  echo "access log: OFF everywhere: nginx access_log off, cdn-edge [log] access = false, Varnish"
  echo "            without varnishncsa (its shared-memory log is always written)"
fi
if [ "$STORAGE" = disk ]; then
  echo "caches:     disk ($store, $(stat -f -c %T "$store")), $CACHE_MB MiB each: cdn-edge disk tier with a"
  echo "            memory tier of a third of the object ($((SIZE / 3 / 1048576)) MiB), nginx proxy_cache there,"
  echo "            Varnish -s file there; files are read through the page cache"
else
  echo "caches:     memory, $CACHE_MB MiB each: cdn-edge memory tier (no disk tier), nginx"
  echo "            proxy_cache on tmpfs ($shm), Varnish -s malloc"
fi
shm_huge=$(findmnt -no OPTIONS --target "$shm" 2>/dev/null | tr ',' '\n' | sed -n 's/^huge=//p')
echo "pages:      shmem_enabled [$(selected "$shmem_setting" || true)] (cdn-edge's page pool, a memfd)$([ "$STORAGE" = memory ] && echo "; nginx's tmpfs huge=${shm_huge:-never}")$([ -n "$SHMEM_HUGE" ] && echo " (SHMEM_HUGE=$SHMEM_HUGE)")"
echo "signing:    cdn-edge HMAC-SHA256 (its own scheme); nginx secure_link MD5 of"
echo "            expiry + URI + secret (403 bad or missing, 410 expired); Varnish: none, the"
echo "            base package has no HMAC or secure-link module, so it serves unsigned URLs"
echo "slicing:    cdn-edge and nginx fetch 1 MiB slices; Varnish fetches the whole object"
echo "TLS:        cdn-edge and nginx, one self-signed ECDSA P-256 certificate, TLS 1.3 only, HTTP/1.1"
echo "            (wrk offers no ALPN); Varnish Cache has no TLS"
echo

# ---------------------------------------------------------------- origin
echo "generating the 256 MiB origin object (AES-128-CTR keystream of a fixed key)"
(
  set +o pipefail
  openssl enc -aes-128-ctr -nosalt -K 000102030405060708090a0b0c0d0e0f \
    -iv 00000000000000000000000000000000 -in /dev/zero 2>/dev/null | head -c "$SIZE" >"$work/origin/object.bin"
)
[ "$(stat -c %s "$work/origin/object.bin")" = "$SIZE" ] || die "could not write the origin object"
object_md5=$(md5sum <"$work/origin/object.bin" | cut -d' ' -f1)

echo "generating a self-signed ECDSA P-256 certificate for 127.0.0.1"
cert=$work/tls/cert.pem key=$work/tls/key.pem
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=cdn-compare" -addext "subjectAltName=IP:127.0.0.1" \
  -keyout "$key" -out "$cert" 2>/dev/null || die "openssl could not make the certificate"

peers_nginx_paths "$work"
workers=auto
[ "$PIN" = 1 ] && workers=1

cat >"$work/origin.conf" <<EOF
$user_line
worker_processes $workers;
daemon off;
pid $work/origin.pid;
error_log $work/origin-error.log warn;
events { worker_connections 4096; }
http {
  $temp_paths
  map \$request_uri \$request_path { ~^(?<p>[^?]*) \$p; }   # \$uri is /object.bin after try_files
  log_format counted '\$request_path "\$http_range" \$status \$body_bytes_sent';
  access_log $work/origin-access.log counted;
  sendfile on;
  keepalive_requests 100000;
  server {
    listen $ORIGIN;
$(peers_origin_object "$work/origin")
    location = $DICT_PATH {
      default_type application/json;
      add_header Cache-Control "max-age=86400";
      return 200 '$DICT_JSON';
    }
    location / { return 404; }
  }
}
EOF

# ---------------------------------------------------------------- nginx edge
if [ "$ACCESS_LOG" = on ]; then
  nginx_log="access_log $work/nginx-access.log combined buffer=64k flush=1s;"
else
  nginx_log="access_log off;"
fi
cat >"$work/nginx-edge.conf" <<EOF
$user_line
worker_processes $workers;
worker_rlimit_nofile 65536;
daemon off;
pid $work/nginx-edge.pid;
error_log $work/nginx-edge-error.log warn;
events { worker_connections 4096; }
http {
  $temp_paths
  $nginx_log
  sendfile on;
  # No tcp_nopush: with it (TCP_CORK) this edge's p99 on range hits was ~35 ms here,
  # against ~3 ms without it, at the same throughput.
  keepalive_requests 10000;
  open_file_cache max=10000 inactive=60s;
  open_file_cache_valid 60s;
  proxy_cache_path $store/video levels=1:2 keys_zone=video:64m max_size=${CACHE_MB}m inactive=1d use_temp_path=off;
  proxy_cache_path $shm/dict levels=1:2 keys_zone=dict:8m max_size=64m inactive=1d use_temp_path=off;
  upstream origin {
    server $ORIGIN;
    keepalive 64;
  }
  server {
    listen $NGINX reuseport;
    # HTTPS: the same server, cache and sendfile setting (OpenSSL writes TLS records
    # itself: sendfile takes effect only with kTLS, which is not configured).
    listen $NGINX_TLS ssl reuseport;
    ssl_certificate $cert;
    ssl_certificate_key $key;
    ssl_protocols TLSv1.3;
    location ~ ^/objects/[^/]+/[^/]+\$ {
      secure_link \$arg_md5,\$arg_expires;
      secure_link_md5 "\$secure_link_expires\$uri $SECRET";
      if (\$secure_link = "") { return 403; }
      if (\$secure_link = "0") { return 410; }
$(peers_nginx_slices)
    }
    location = $DICT_PATH {
      proxy_cache dict;
      proxy_cache_key \$uri\$is_args\$args;
      proxy_cache_lock on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass http://origin;
    }
    location / { return 404; }
  }
}
EOF

# ---------------------------------------------------------------- Varnish
cat >"$work/varnish.vcl" <<EOF
vcl 4.1;
# The builtin VCL does the rest: GETs are cached by URL and Host, for the max-age the
# origin sends; a Range request on a miss fetches the whole object and is served from it.
backend origin {
  .host = "${ORIGIN%:*}";
  .port = "${ORIGIN#*:}";
}
EOF
varnish_params=()
if [ "$STORAGE" = disk ]; then varnish_storage="file,$store/varnish.bin,${CACHE_MB}M"; else varnish_storage="malloc,${CACHE_MB}M"; fi
[ "$PIN" = 1 ] && varnish_params=(-p thread_pools=1)

# ---------------------------------------------------------------- cdn-edge
cat >"$work/edge.toml" <<EOF
[listen]
http = "$CDN"
https = "$CDN_TLS"
admin = "$CDN_ADMIN"

[tls]
cert = "$cert"
key = "$key"

[signing]
clock_skew_secs = 30
[[signing.keys]]
id = "k1"
secret = "$SECRET"

[cache]
slice_bytes = $SLICE
memory_bytes = $([ "$STORAGE" = disk ] && echo $((SIZE / 3)) || echo $((CACHE_MB * 1048576)))
sendfile = $EDGE_SENDFILE
$([ "$STORAGE" = disk ] && printf '\n[cache.disk]\npath = "%s"\nmax_bytes = %d\n' "$store/edge" $((CACHE_MB * 1048576)))

[origin]
urls = ["http://$ORIGIN"]
path = "/objects/{o}/{v}"

[dictionary]
paths = ["$DICT_PATH"]
upstream = "http://$ORIGIN"

[server]
threads = $EDGE_THREADS
$(peers_edge_quick_stop "$work")

[log]
level = "info"
access = $([ "$ACCESS_LOG" = on ] && echo true || echo false)
EOF
"$bin" check-config "$work/edge.toml" >/dev/null
if [ "$SHOW_CONFIG" = 1 ]; then
  for f in origin.conf nginx-edge.conf varnish.vcl edge.toml; do
    echo "== $f"
    sed "s#$work#\$WORK#g; s#$shm#\$SHM#g" "$work/$f"
    echo
  done
fi

# ---------------------------------------------------------------- start
wait_http() { # name url [curl args]: until it answers (any status), up to 15 s
  local name=$1 url=$2
  shift 2
  for _ in $(seq 1 150); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$@" "$url" || true)" != 000 ] && return 0
    sleep 0.1
  done
  die "$name did not start; its log is in $work (kept until exit)"
}
"${on_load[@]}" /usr/sbin/nginx -p "$work/" -e "$work/origin-error.log" -c "$work/origin.conf" &
origin_pid=$!
pids+=("$origin_pid:TERM")
"${on_server[@]}" /usr/sbin/nginx -p "$work/" -e "$work/nginx-edge-error.log" -c "$work/nginx-edge.conf" &
nginx_pid=$!
pids+=("$nginx_pid:TERM")
"${on_server[@]}" /usr/sbin/varnishd -F -j none -a "$VARNISH" -T "$VARNISH_ADMIN" -n "$work/varnish" \
  -f "$work/varnish.vcl" -s "$varnish_storage" -P "$work/varnish.pid" "${varnish_params[@]}" \
  >"$work/varnish.log" 2>&1 &
varnish_pid=$!
pids+=("$varnish_pid:TERM")
"${on_server[@]}" "$bin" serve --conf "$work/edge.toml" >"$work/cdn-edge.log" 2>&1 &
cdn_pid=$!
pids+=("$cdn_pid:INT")
wait_http origin "http://$ORIGIN/"
wait_http nginx "http://$NGINX/"
wait_http "nginx (https)" "https://$NGINX_TLS/" --cacert "$cert"
wait_http varnish "http://$VARNISH/"
wait_http cdn-edge "http://$CDN_ADMIN/healthz"
wait_http "cdn-edge (https)" "https://$CDN_TLS/" --cacert "$cert"
ncsa_pid=""
if [ "$ACCESS_LOG" = on ]; then
  # Varnish's access log is a process of its own: it runs on Varnish's core and its cpu
  # counts as Varnish's, as nginx's and cdn-edge's logging counts as theirs.
  "${on_server[@]}" varnishncsa -n "$work/varnish" -w "$work/varnish-access.log" &
  ncsa_pid=$!
  pids+=("$ncsa_pid:TERM")
fi

# ---------------------------------------------------------------- processes and cpus
tree_pids() { # pid: sets tree to the pid and its child processes (from /proc, no forks)
  tree=("$1")
  local f k
  for f in /proc/"$1"/task/*/children; do
    k=()
    read -ra k 2>/dev/null <"$f" || true
    tree+=("${k[@]}")
  done
}
group_of() { # system: the process group whose cpu time is that system's
  case $1 in
    cdn*) echo cdn ;;
    nginx*) echo nginx ;;
    varnish*) echo varnish ;;
  esac
}
# sample NAME: sets the array NAME to cpu ticks, read from /proc at one moment:
#   0 busy 1 total: the servers' core (PIN=1) or all cpus (PIN=0); busy = user + nice +
#                   system + irq + softirq + steal, total = busy + idle + iowait. (With tick
#                   accounting an interrupt is charged to the task it interrupted, so a
#                   server's ticks include the softirq work it caused, its loopback sends.)
#   2 busy 3 total: the load's core (PIN=1) or all cpus again (PIN=0)
#   4 cdn-edge 5 nginx edge 6 Varnish: user + system of each server's processes and
#                   threads, and of the worker processes its main process has reaped
#   7 origin 8 this shell 9 this shell's reaped children (wrk, curl, the checks)
sample() {
  local list=() p i
  for p in cdn:$cdn_pid nginx:$nginx_pid varnish:$varnish_pid varnish:$ncsa_pid origin:$origin_pid; do
    [ -n "${p#*:}" ] || continue
    tree_pids "${p#*:}"
    list+=("${p%%:*}:main:${tree[0]}")
    for ((i = 1; i < ${#tree[@]}; i++)); do list+=("${p%%:*}:child:${tree[i]}"); done
  done
  list+=("self:self:$$")
  # getline, not file operands: a worker that exits meanwhile is skipped, not an error
  read -ra "$1" < <(awk -v list="${list[*]}" -v cs="cpu$SERVER_CPU" -v cl="cpu$LOAD_CPU" -v pin="$PIN" 'BEGIN {
    while ((getline line < "/proc/stat") > 0) {
      split(line, f, " ")
      b = f[2] + f[3] + f[4] + f[7] + f[8] + f[9]; t = b + f[5] + f[6]
      if (f[1] == "cpu") { ab = b; at = t } else if (f[1] == cs) { sb = b; st = t } else if (f[1] == cl) { lb = b; lt = t }
    }
    if (pin != 1) { sb = lb = ab; st = lt = at }
    n = split(list, items, " ")
    for (i = 1; i <= n; i++) {
      split(items[i], it, ":"); file = "/proc/" it[3] "/stat"
      if ((getline line < file) > 0) {
        sub(/^.*\) /, "", line); split(line, s, " ")
        ticks[it[1]] += s[12] + s[13]
        if (it[2] == "main") ticks[it[1]] += s[14] + s[15]
        if (it[2] == "self") kids = s[14] + s[15]
      }
      close(file)
    }
    printf "%.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.0f\n", sb, st, lb, lt,
      ticks["cdn"], ticks["nginx"], ticks["varnish"], ticks["origin"], ticks["self"], kids
  }')
}
# window GROUP "sample0" "sample1": prints, over the time between the two samples,
#   the server's ticks, wrk's (this shell's reaped children) ticks, the server's and wrk's
#   share of their core in % (PIN=0: of one cpu's time), and the share of each core other
#   work took in % (PIN=0: of all cpus, twice). GROUP: cdn, nginx or varnish, the server
#   under test; "idle": none (before a run every server must be idle too).
# Other work on the servers' core is anything but the server under test (the idle servers
# included); on the load's core anything but the origin, wrk and this shell.
window() {
  awk -v g="$1" -v a="$2" -v b="$3" -v pin="$PIN" -v ncpu="$ncpus" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= 10; i++) d[i] = y[i] - x[i]
    col["cdn"] = 5; col["nginx"] = 6; col["varnish"] = 7
    srv = (g in col) ? d[col[g]] : 0
    wrk = d[10]; load = d[8] + d[9] + d[10]
    if (pin == 1) {
      cs = d[2]; cl = d[4]
      os = d[1] - srv; ol = d[3] - (g == "idle" ? d[9] + d[10] : load)
      ps = cs; pl = cl
    } else {
      own = d[5] + d[6] + d[7] + load
      os = ol = d[1] - own
      cs = cl = d[2]; ps = pl = d[2] / ncpu
    }
    if (os < 0) os = 0; if (ol < 0) ol = 0
    printf "%d %d %d %d %d %d\n", srv, wrk, (ps > 0 ? 100 * srv / ps : 0), (pl > 0 ? 100 * wrk / pl : 0),
      (cs > 0 ? 100 * os / cs : 0), (cl > 0 ? 100 * ol / cl : 0)
  }'
}

pin_bad=0
check_pinned() { # label cpu pid...: every thread of the processes and their children on
  # cpu; a pid of "-N" is process N alone (this shell, whose children are the servers)
  local label=$1 want=$2 p t line np=0 nthr=0 wrong="" main
  shift 2
  main=${1#-}
  for p in "$@"; do
    [ -n "$p" ] || continue
    if [ "${p:0:1}" = - ]; then tree=("${p#-}"); else tree_pids "$p"; fi
    for t in "${tree[@]}"; do
      np=$((np + 1))
      while read -r line; do
        nthr=$((nthr + 1))
        [ "${line##*: }" = "$want" ] || wrong="$wrong ${line%%\'*}: ${line##*: };"
      done < <(taskset -acp "$t" 2>/dev/null || true)
    done
  done
  if [ -z "$wrong" ] && [ "$nthr" -gt 0 ]; then
    printf '  %-13s pid %-8s %2d process(es), %3d threads: all on cpu %s\n' "$label" "$main" "$np" "$nthr" "$want"
  else
    printf '  %-13s pid %-8s !! not all on cpu %s:%s\n' "$label" "$main" "$want" "${wrong:- no threads found}"
    pin_bad=$((pin_bad + 1))
  fi
}
check_all_pinned() {
  check_pinned cdn-edge "$SERVER_CPU" "$cdn_pid"
  check_pinned "nginx edge" "$SERVER_CPU" "$nginx_pid"
  check_pinned varnish "$SERVER_CPU" "$varnish_pid" "$ncsa_pid"
  check_pinned "origin nginx" "$LOAD_CPU" "$origin_pid"
  check_pinned "this script" "$LOAD_CPU" "-$$"
}
load_pin_bad=0
pinned_load() { # pid: whether the process (started via env/taskset) runs on LOAD_CPU only
  local pid=$1 comm aff
  [ "$PIN" = 1 ] || return 0
  for _ in $(seq 1 200); do # until env and taskset have exec'd into the program
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 0
    case $comm in env | taskset) sleep 0.01 ;; *) break ;; esac
  done
  aff=$(taskset -cp "$pid" 2>/dev/null) || return 0
  [ "${aff##*: }" = "$LOAD_CPU" ] && return 0
  load_pin_bad=$((load_pin_bad + 1))
  return 1
}

if [ "$PIN" = 1 ]; then
  echo "== pinning (taskset -acp on every process and thread; wrk and curl are checked as each starts)"
  check_all_pinned
  [ "$pin_bad" = 0 ] || die "the servers or the load are not on the cpus asked for (above)"
  echo
fi

# ---------------------------------------------------------------- TLS
tls_of() { # host:port: "protocol cipher group", as openssl s_client negotiates them
  # (-brief prints them as soon as the handshake ends, to stderr)
  local out
  out=$(timeout 10 openssl s_client -brief -connect "$1" </dev/null 2>&1 || true)
  awk -F': *' '$1 == "Protocol version" { p = $2 } $1 == "Ciphersuite" { c = $2 } $1 == "Server Temp Key" { k = $2 }
    END { printf "%s %s %s\n", p ? p : "none", c ? c : "none", k ? k : "?" }' <<<"$out"
}
echo "== TLS (openssl s_client with its defaults: the library and client settings wrk uses)"
read -r cdn_proto cdn_cipher cdn_group <<<"$(tls_of "$CDN_TLS")"
read -r nginx_proto nginx_cipher nginx_group <<<"$(tls_of "$NGINX_TLS")"
printf '  %-9s %s: %s %s, key exchange %s\n' cdn-edge "$CDN_TLS" "$cdn_proto" "$cdn_cipher" "$cdn_group"
printf '  %-9s %s: %s %s, key exchange %s\n' nginx "$NGINX_TLS" "$nginx_proto" "$nginx_cipher" "$nginx_group"
echo "  varnish   no HTTPS: Varnish Cache (open source) does not terminate TLS"
echo "  certificate: self-signed, ECDSA P-256 ($(openssl x509 -in "$cert" -noout -ext subjectAltName 2>/dev/null | tail -1 | sed 's/^ *//'))"
if [ "$cdn_proto $cdn_cipher" != "$nginx_proto $nginx_cipher" ] || [ "$cdn_proto" != TLSv1.3 ]; then
  die "cdn-edge and nginx must negotiate the same TLS 1.3 protocol and cipher suite (above)"
fi
[ "$cdn_group" = "$nginx_group" ] || echo "  !! different key exchange groups (one handshake per connection: wrk keeps them open)"
echo

# ---------------------------------------------------------------- URLs
ttl=$((3600 + RUNS * 12 * (SECS + QUIET_WAIT + 10)))  # the whole run, quiet waits included
cdn_query() { "$bin" sign --conf "$work/edge.toml" --key k1 --object "$1" --version "$2" --ttl "$ttl"; }
nginx_md5() { # expires uri
  printf '%s' "$1$2 $SECRET" | openssl md5 -binary | openssl base64 | tr '+/' '-_' | tr -d '='
}
nginx_target() { # uri: the uri with its secure_link query
  local e=$(($(date +%s) + ttl))
  echo "$1?md5=$(nginx_md5 "$e" "$1")&expires=$e"
}
cdn_q=$(cdn_query "$OBJ" "$VER")
nginx_t=$(nginx_target "/objects/$OBJ/$VER")
varnish_t="/objects/$OBJ/$VER"

origin_lines() { [ -f "$work/origin-access.log" ] && wc -l <"$work/origin-access.log" || echo 0; }
origin_count() { # uri: origin requests for it so far, and bytes sent
  awk -v u="$1" '$1 == u { n++; b += $4 } END { printf "%d %d\n", n, b }' "$work/origin-access.log"
}

# ---------------------------------------------------------------- correctness
fails=0
ok() { printf '  ok    %s\n' "$1"; }
bad() { printf '  FAIL  %s\n' "$1"; fails=$((fails + 1)); }
expect_status() { # label want url [curl args]
  local label=$1 want=$2 url=$3 got
  shift 3
  got=$(curl -s -o /dev/null -m 30 -w '%{http_code}' "$@" "$url" || true)
  if [ "$got" = "$want" ]; then ok "$label: $got"; else bad "$label: $got, want $want"; fi
}
expect_bytes() { # label want_status start len url [curl args]: status and md5 of the body
  local label=$1 want=$2 a=$3 n=$4 url=$5 got sum ref
  shift 5
  got=$(curl -s -o "$work/body" -m 60 -w '%{http_code}' "$@" "$url" || true)
  sum=$(md5sum <"$work/body" | cut -d' ' -f1)
  ref=$(dd if="$work/origin/object.bin" iflag=skip_bytes,count_bytes skip="$a" count="$n" status=none | md5sum | cut -d' ' -f1)
  if [ "$got" = "$want" ] && [ "$sum" = "$ref" ]; then ok "$label: $got, bytes $a+$n match the origin file"
  else bad "$label: status $got (want $want), md5 $sum (want $ref)"; fi
}
expect_dict() { # label url
  local got ctype
  got=$(curl -s -m 10 -D "$work/headers" "$2" || true)
  ctype=$(tr -d '\r' <"$work/headers" | awk -F': ' 'tolower($1) == "content-type" {print $2}')
  if [ "$got" = "$DICT_JSON" ] && [[ "$ctype" == application/json* ]]; then ok "$1: 200, $ctype, ${#got}-char JSON"
  else bad "$1: body '$got', content-type '$ctype'"; fi
}

echo "== correctness (before any timing)"
now=$(date +%s)
exp_e=$((now - 3600))
exp_sc=$(printf '%s' "o=$OBJ&v=$VER&e=$exp_e&t=" | openssl dgst -sha256 -hmac "$SECRET" -r | cut -d' ' -f1)
sc=${cdn_q##*sc=}
flip=0
[ "${sc: -1}" = 0 ] && flip=1
bad_q="${cdn_q%?}$flip"   # one hex digit of the signature changed
a1=0 a2=$((SLICE - 1000)) a3=$((SIZE - LEN))
expect_bytes "cdn-edge /range/$a1-$((a1 + LEN - 1))" 200 $a1 $LEN "http://$CDN/range/$a1-$((a1 + LEN - 1))?$cdn_q"
expect_bytes "cdn-edge /range across a slice boundary" 200 $a2 $LEN "http://$CDN/range/$a2-$((a2 + LEN - 1))?$cdn_q"
expect_bytes "cdn-edge / + Range, last bytes" 206 $a3 $LEN "http://$CDN/?$cdn_q" -H "Range: bytes=$a3-$((a3 + LEN - 1))"
expect_status "cdn-edge unsigned" 403 "http://$CDN/range/0-9?o=$OBJ&v=$VER"
expect_status "cdn-edge bad signature" 403 "http://$CDN/range/0-9?$bad_q"
expect_status "cdn-edge expired" 410 "http://$CDN/range/0-9?o=$OBJ&v=$VER&e=$exp_e&t=&sc=$exp_sc"
n_exp=$((now - 60))
expect_bytes "nginx Range, first bytes" 206 $a1 $LEN "http://$NGINX$nginx_t" -H "Range: bytes=$a1-$((a1 + LEN - 1))"
expect_bytes "nginx Range across a slice boundary" 206 $a2 $LEN "http://$NGINX$nginx_t" -H "Range: bytes=$a2-$((a2 + LEN - 1))"
expect_bytes "nginx Range, last bytes" 206 $a3 $LEN "http://$NGINX$nginx_t" -H "Range: bytes=$a3-$((a3 + LEN - 1))"
expect_status "nginx unsigned" 403 "http://$NGINX/objects/$OBJ/$VER"
expect_status "nginx bad md5" 403 "http://$NGINX/objects/$OBJ/$VER?md5=AAAAAAAAAAAAAAAAAAAAAA&expires=$((now + 600))"
expect_status "nginx other object, same md5" 403 "http://$NGINX/objects/other/$VER?${nginx_t#*\?}"
expect_status "nginx expired" 410 "http://$NGINX/objects/$OBJ/$VER?md5=$(nginx_md5 $n_exp "/objects/$OBJ/$VER")&expires=$n_exp"
expect_bytes "varnish Range, first bytes" 206 $a1 $LEN "http://$VARNISH$varnish_t" -H "Range: bytes=$a1-$((a1 + LEN - 1))"
expect_bytes "varnish Range across a slice boundary" 206 $a2 $LEN "http://$VARNISH$varnish_t" -H "Range: bytes=$a2-$((a2 + LEN - 1))"
expect_bytes "varnish Range, last bytes" 206 $a3 $LEN "http://$VARNISH$varnish_t" -H "Range: bytes=$a3-$((a3 + LEN - 1))"
# HTTPS as wrk speaks it (HTTP/1.1), the certificate verified
tls_curl=(--http1.1 --cacert "$cert")
expect_bytes "cdn-edge https / + Range, first bytes" 206 $a1 $LEN "https://$CDN_TLS/?$cdn_q" -H "Range: bytes=$a1-$((a1 + LEN - 1))" "${tls_curl[@]}"
expect_bytes "cdn-edge https / + Range across a slice boundary" 206 $a2 $LEN "https://$CDN_TLS/?$cdn_q" -H "Range: bytes=$a2-$((a2 + LEN - 1))" "${tls_curl[@]}"
expect_bytes "cdn-edge https /range, last bytes" 200 $a3 $LEN "https://$CDN_TLS/range/$a3-$((a3 + LEN - 1))?$cdn_q" "${tls_curl[@]}"
expect_status "cdn-edge https bad signature" 403 "https://$CDN_TLS/range/0-9?$bad_q" "${tls_curl[@]}"
expect_bytes "nginx https Range, first bytes" 206 $a1 $LEN "https://$NGINX_TLS$nginx_t" -H "Range: bytes=$a1-$((a1 + LEN - 1))" "${tls_curl[@]}"
expect_bytes "nginx https Range across a slice boundary" 206 $a2 $LEN "https://$NGINX_TLS$nginx_t" -H "Range: bytes=$a2-$((a2 + LEN - 1))" "${tls_curl[@]}"
expect_bytes "nginx https Range, last bytes" 206 $a3 $LEN "https://$NGINX_TLS$nginx_t" -H "Range: bytes=$a3-$((a3 + LEN - 1))" "${tls_curl[@]}"
expect_status "nginx https unsigned" 403 "https://$NGINX_TLS/objects/$OBJ/$VER" "${tls_curl[@]}"

echo "== warm-up: the whole object through each edge, and the dictionary URL once"
for sys in cdn-edge nginx varnish; do
  case $sys in
    cdn-edge) url="http://$CDN/?$cdn_q" ;;
    nginx) url="http://$NGINX$nginx_t" ;;
    varnish) url="http://$VARNISH$varnish_t" ;;
  esac
  t0=$(date +%s%N)
  got=$(curl -s -m 120 -w '%{http_code}' -o "$work/body" "$url" || true)
  ms=$((($(date +%s%N) - t0) / 1000000))
  sum=$(md5sum <"$work/body" | cut -d' ' -f1)
  if [ "$got" = 200 ] && [ "$sum" = "$object_md5" ]; then ok "$sys full GET: 200, all $SIZE bytes match ($ms ms)"
  else bad "$sys full GET: status $got, md5 $sum (want $object_md5)"; fi
done
rm -f "$work/body"
expect_dict "cdn-edge dictionary (miss)" "http://$CDN$DICT_URI"
expect_dict "nginx dictionary (miss)" "http://$NGINX$DICT_URI"
expect_dict "varnish dictionary (miss)" "http://$VARNISH$DICT_URI"
expect_dict "cdn-edge dictionary (hit)" "http://$CDN$DICT_URI"
# Each edge asked the origin for the object only while filling it: cdn-edge and nginx
# once per slice (HTTP and HTTPS share one cache), Varnish once in all.
fill_edge=$(grep -c "^/objects/$OBJ/$VER \"bytes=" "$work/origin-access.log" || true)
slices=$((SIZE / SLICE))
dict_fill=$(grep -c "^$DICT_PATH " "$work/origin-access.log" || true)
full_fill=$(grep -c "^/objects/$OBJ/$VER \"-\"" "$work/origin-access.log" || true)
if [ "$fill_edge" = $((2 * slices)) ] && [ "$full_fill" = 1 ]; then
  ok "origin requests to fill the object: $fill_edge slice GETs (cdn-edge + nginx, $slices slices each), $full_fill whole-object GET (varnish)"
else
  bad "origin requests to fill the object: $fill_edge slice GETs (want $((2 * slices))), $full_fill whole-object GETs (want 1)"
fi
if [ "$dict_fill" = 3 ]; then ok "origin dictionary requests: 3 (one per edge)"
else bad "origin dictionary requests: $dict_fill, want 3 (one per edge)"; fi
[ "$fails" = 0 ] || die "$fails correctness check(s) failed: not timing broken configurations"
if [ "$STORAGE" = disk ]; then
  # cdn-edge writes slices to disk behind the requests that filled them, and a full write
  # queue skips a write: until every slice is on disk, a hit run would ask the origin.
  edge_metric() { curl -s -m 5 "http://$CDN_ADMIN/metrics" | awk -v m="$1" '$1 == m { printf "%.0f\n", $2 }'; }
  on_disk=0
  for pass in 1 2 3 4 5; do
    for _ in $(seq 1 300); do # until the writer has settled (up to 30 s)
      w0=$(edge_metric cdn_edge_disk_writes_total)
      sleep 0.1
      [ "$(edge_metric cdn_edge_disk_writes_total)" = "$w0" ] && break
    done
    on_disk=$(edge_metric 'cdn_edge_cache_entries{tier="disk"}')
    [ "${on_disk:-0}" -ge "$slices" ] && break
    echo "  cdn-edge disk tier holds ${on_disk:-0} of $slices slices (pass $pass): the whole object again"
    curl -s -m 120 -o /dev/null "http://$CDN/?$cdn_q" || true
  done
  if [ "${on_disk:-0}" -ge "$slices" ]; then
    ok "cdn-edge disk tier holds all $slices slices ($(edge_metric 'cdn_edge_cache_entries{tier="memory"}') in its memory tier)"
  else
    die "cdn-edge disk tier holds ${on_disk:-0} of $slices slices after 5 passes"
  fi
  echo "  on disk: $(du -sh "$store/edge" | cut -f1) cdn-edge, $(du -sh "$store/video" | cut -f1) nginx, $(du -sh --apparent-size "$store/varnish.bin" | cut -f1) Varnish file (apparent size)"
fi
echo

# ---------------------------------------------------------------- load runs
# R: "workload|system|run" -> space-separated fields. wrk runs (range, https, dict):
#   0 req/s 1 MB/s 2 p50 ms 3 p99 ms 4 non-2xx 5 socket errors 6 server cpu us/req
#   7 wrk cpu us/req 8 server % of its core 9 wrk % of its core 10 load-bound (0/1)
# storm runs: 0 server cpu us/req 1 req/s 2 p99 ms 3 all ms 4 p50 ms 5 max ms
#   6 origin requests 7 origin MB 8 wrong or missing answers
declare -A R
range_systems=(cdn-path cdn-header nginx varnish)
https_systems=(cdn-https nginx-https)
dict_systems=(cdn-edge nginx varnish)
label() { # system [workload]
  case $1 in
    cdn-path) echo "cdn-edge /range/a-b" ;;
    cdn-header | cdn-https) echo "cdn-edge / + Range" ;;
    cdn-edge) echo "cdn-edge" ;;
    nginx | nginx-https) [ "${2:-}" = dict ] && echo "nginx (proxy_cache)" || echo "nginx (secure_link, slice)" ;;
    varnish) [ "${2:-}" = dict ] && echo "varnish" || echo "varnish (unsigned)" ;;
  esac
}
hz=$(getconf CLK_TCK)
rotate() { # n items...: the items rotated left by n
  local n=$1
  shift
  local a=("$@") i
  for ((i = 0; i < ${#a[@]}; i++)); do echo "${a[(i + n) % ${#a[@]}]}"; done
}
# Other work on the machine skews every number here. Before each timed run the script
# waits (up to QUIET_WAIT s) for the cores to be idle, and during it measures how much
# cpu went to anything else (see window).
busy_s=0 busy_l=0 mark=()
quiet() { # waits until the cores are idle (under 10% for 1 s), up to QUIET_WAIT s; sets mark
  local a=() b=() waited=0 idle
  while :; do
    sample a
    sleep 1
    sample b
    read -ra idle <<<"$(window idle "${a[*]}" "${b[*]}")"
    busy_s=${idle[4]} busy_l=${idle[5]}
    { [ "$busy_s" -le 10 ] && [ "$busy_l" -le 10 ]; } || [ "$waited" -ge "$QUIET_WAIT" ] && break
    waited=$((waited + 1))
  done
  sample mark # the timed run starts now
}
timed=0 disturbed=0 other_s=0 other_l=0
measured() { # system: after a timed run: sets win (window fields) from mark to now
  local now=()
  sample now
  read -ra win <<<"$(window "$(group_of "$1")" "${mark[*]}" "${now[*]}")"
  other_s=${win[4]} other_l=${win[5]}
  timed=$((timed + 1))
  if [ "$other_s" -gt 5 ] || [ "$other_l" -gt 5 ]; then disturbed=$((disturbed + 1)); fi
}
flag() {
  if [ "$other_s" -gt 5 ] || [ "$other_l" -gt 5 ]; then
    if [ "$PIN" = 1 ]; then printf '  !! other work took %d%% of cpu %s, %d%% of cpu %s' "$other_s" "$SERVER_CPU" "$other_l" "$LOAD_CPU"
    else printf '  !! other work took %d%% of the cpus' "$other_s"; fi
  fi
  return 0
}
run_wrk() { # key url [env...]: after quiet, runs wrk and stores the parsed result under key
  local key=$1 url=$2 sys pin_note=""
  shift 2
  sys=${key#*|} sys=${sys%%|*}
  env "$@" "${on_load[@]}" timeout $((SECS + 60)) \
    wrk -t"$WRK_THREADS" -c"$CONNS" -d"${SECS}s" --timeout 5s --latency -s "$lua" "$url" >"$work/wrk.out" 2>&1 &
  bg_pid=$!
  pinned_load "$bg_pid" || pin_note="  !! wrk not on cpu $LOAD_CPU"
  wait "$bg_pid" || true
  bg_pid=""
  measured "$sys"
  R[$key]=$(awk -v ticks="${win[0]}" -v wticks="${win[1]}" -v hz="$hz" -v sp="${win[2]}" -v wp="${win[3]}" -v pin="$PIN" '/^RESULT/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      d = v["duration_us"] / 1e6
      n = v["requests"] > 0 ? v["requests"] : 1
      printf "%.0f %.0f %.2f %.2f %d %d %.1f %.1f %d %d %d\n", v["requests"] / d, v["bytes"] / d / 1e6,
        v["p50_us"] / 1000, v["p99_us"] / 1000, v["non2xx"], v["socket_errors"],
        ticks / hz * 1e6 / n, wticks / hz * 1e6 / n, sp, wp, (pin == 1 && wp >= 90 && sp < 90)
    }' "$work/wrk.out")
  [ -n "${R[$key]}" ] || { cat "$work/wrk.out" >&2; die "wrk gave no result for $key"; }
  R[$key|note]=$pin_note
}
raw_line() { # workload system run
  local v warn
  read -ra v <<<"${R[$1|$2|$3]}"
  warn=${R[$1|$2|$3|note]}
  [ "${v[4]}" != 0 ] || [ "${v[5]}" != 0 ] && warn="$warn  !! non-2xx ${v[4]}, socket errors ${v[5]}"
  [ "${v[10]}" = 1 ] && warn="$warn  !! load-bound"
  warn="$warn$(flag)"
  printf '  run %d  %-5s %-27s cpu %6s us/req  %6s req/s  p99 %6s ms  p50 %6s ms  %5s MB/s  wrk %6s us/req  core %% server %3s wrk %3s%s\n' \
    "$3" "$1" "$(label "$2" "$1")" "${v[6]}" "${v[0]}" "${v[3]}" "${v[2]}" "${v[1]}" "${v[7]}" "${v[8]}" "${v[9]}" "$warn"
}

# cold-miss storm: STORM requests for distinct ranges spread evenly over a version that
# no edge has cached yet (a new v per system and run; the origin serves any v).
step=$(((SIZE - LEN) / (STORM - 1)))
storm_slices=$(awk -v n=$STORM -v s=$step -v l=$LEN -v z=$SLICE 'BEGIN {
  for (i = 0; i < n; i++) { a = i * s; for (k = int(a / z); k <= int((a + l - 1) / z); k++) seen[k] = 1 }
  for (k in seen) c++; print c }')
storm() { # system run: after quiet; stores R[storm|system|run]
  local sys=$1 run=$2 ver="storm-r$2-$1" dir="$work/storm/$1-$2" cfg i a b url hdr q pin_note=""
  mkdir -p "$dir"
  case $sys in
    cdn-edge) q=$(cdn_query "$OBJ" "$ver") ;;
    nginx) q=$(nginx_target "/objects/$OBJ/$ver") ;;
  esac
  cfg="$dir/curl.cfg"
  { echo "parallel"; echo "parallel-max = $STORM"; echo "parallel-immediate"; } >"$cfg"
  for ((i = 0; i < STORM; i++)); do
    a=$((i * step)) b=$((i * step + LEN - 1)) hdr=""
    case $sys in
      cdn-edge) url="http://$CDN/range/$a-$b?$q" ;;
      nginx) url="http://$NGINX$q" hdr="Range: bytes=$a-$b" ;;
      varnish) url="http://$VARNISH/objects/$OBJ/$ver" hdr="Range: bytes=$a-$b" ;;
    esac
    [ $i -gt 0 ] && echo "next" >>"$cfg"
    {
      echo "url = \"$url\""
      echo "output = \"$dir/$i\""
      [ -n "$hdr" ] && echo "header = \"$hdr\""
      echo "max-time = 60"
      printf 'write-out = "%%{http_code} %%{size_download} %%{time_total} %d %d\\n"\n' "$i" "$a"
    } >>"$cfg"
  done
  local t0 t1
  t0=$(date +%s%N)
  "${on_load[@]}" timeout 120 curl -s -K "$cfg" >"$dir/out" 2>/dev/null &
  bg_pid=$!
  pinned_load "$bg_pid" || pin_note="  !! curl not on cpu $LOAD_CPU"
  wait "$bg_pid" || true
  bg_pid=""
  t1=$(date +%s%N)
  local last=-1 cur
  for _ in $(seq 1 50); do # until the origin's log has caught up with fetches still streaming
    cur=$(origin_lines)
    [ "$cur" = "$last" ] && break
    last=$cur
    sleep 0.2
  done
  # the server's cpu: from the first request until the origin's fills have ended
  measured "$sys"
  # every answer: the right status, length and bytes
  local want=206 nbad=0 code size idx start ref sum
  [ "$sys" = cdn-edge ] && want=200
  while read -r code size _ idx start; do
    ref=$(dd if="$work/origin/object.bin" iflag=skip_bytes,count_bytes skip="$start" count="$LEN" status=none | md5sum)
    sum=$(md5sum <"$dir/$idx")
    if [ "$code" != "$want" ] || [ "$size" != "$LEN" ] || [ "$sum" != "$ref" ]; then nbad=$((nbad + 1)); fi
  done <"$dir/out"
  local answered wall stats
  answered=$(wc -l <"$dir/out")
  nbad=$((nbad + STORM - answered))
  wall=$(((t1 - t0) / 1000000))
  # nearest-rank percentiles of the answers' times
  stats=$(awk '{print $3}' "$dir/out" | sort -g | awk '{ t[NR] = $1 }
    END { r = int(NR * 0.99); if (r < NR * 0.99) r++; printf "%.1f %.1f %.1f", t[r] * 1000, t[int((NR + 1) / 2)] * 1000, t[NR] * 1000 }')
  read -r oreq obytes < <(origin_count "/objects/$OBJ/$ver")
  read -r p99 p50 max <<<"$stats"
  R[storm|$sys|$run]=$(awk -v ticks="${win[0]}" -v hz="$hz" -v n="$STORM" -v w="$wall" -v p99="$p99" -v p50="$p50" \
    -v max="$max" -v o="$oreq" -v b="$obytes" -v bad="$nbad" 'BEGIN {
      printf "%.0f %.0f %s %d %s %s %d %.1f %d\n", ticks / hz * 1e6 / n, (w > 0 ? n * 1000 / w : 0), p99, w, p50, max, o, b / 1e6, bad }')
  R[storm|$sys|$run|note]=$pin_note
  rm -rf "$dir"
}

echo "== load runs"
rechecked=0
for ((run = 1; run <= RUNS; run++)); do
  before=$(origin_lines)
  for sys in $(rotate $((run - 1)) "${range_systems[@]}"); do
    quiet
    case $sys in
      cdn-path) run_wrk "range|$sys|$run" "http://$CDN" MODE=path QUERY="$cdn_q" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
      cdn-header) run_wrk "range|$sys|$run" "http://$CDN" MODE=header TARGET="/?$cdn_q" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
      nginx) run_wrk "range|$sys|$run" "http://$NGINX" MODE=header TARGET="$nginx_t" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
      varnish) run_wrk "range|$sys|$run" "http://$VARNISH" MODE=header TARGET="$varnish_t" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
    esac
    raw_line range "$sys" "$run"
  done
  for sys in $(rotate $((run - 1)) "${https_systems[@]}"); do
    quiet
    case $sys in
      cdn-https) run_wrk "https|$sys|$run" "https://$CDN_TLS" MODE=header TARGET="/?$cdn_q" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
      nginx-https) run_wrk "https|$sys|$run" "https://$NGINX_TLS" MODE=header TARGET="$nginx_t" OBJECT_SIZE=$SIZE RANGE_LEN=$LEN ;;
    esac
    raw_line https "$sys" "$run"
  done
  for sys in $(rotate $((run - 1)) "${dict_systems[@]}"); do
    case $sys in
      cdn-edge) url="http://$CDN$DICT_URI" ;;
      nginx) url="http://$NGINX$DICT_URI" ;;
      varnish) url="http://$VARNISH$DICT_URI" ;;
    esac
    quiet
    run_wrk "dict|$sys|$run" "$url" MODE=fixed
    raw_line dict "$sys" "$run"
  done
  # Not counted: cdn-edge's one re-check of the object's size (a bytes=0-0 request), made
  # once cache.meta_ttl_secs (10 s) have passed since its first fill.
  during=$(($(origin_lines) - before)) recheck=0
  if [ "$during" != 0 ] && [ "$rechecked" = 0 ]; then
    recheck=$(tail -n "$during" "$work/origin-access.log" | grep -c "^/objects/$OBJ/$VER \"bytes=0-0\" 206 " || true)
    [ "$recheck" -le 1 ] || recheck=1
    rechecked=$recheck
  fi
  printf '  run %d  origin requests during the hit workloads: %d (want 0)%s\n' "$run" $((during - recheck)) \
    "$([ "$recheck" = 0 ] || echo ", besides cdn-edge's one bytes=0-0 re-check of the object's size")"
  if [ $((during - recheck)) != 0 ]; then
    tail -n "$during" "$work/origin-access.log" | head -5 | sed 's/^/          !! origin: /'
  fi
  for sys in $(rotate $((run - 1)) "${dict_systems[@]}"); do
    quiet
    storm "$sys" "$run"
    read -ra v <<<"${R[storm|$sys|$run]}"
    printf '  run %d  storm %-27s cpu %6s us/req  %6s req/s  p99 %6s ms  p50 %6s ms  all %d done in %d ms  origin %d requests, %s MB%s\n' \
      "$run" "$(label "$sys")" "${v[0]}" "${v[1]}" "${v[2]}" "${v[4]}" "$STORM" "${v[3]}" "${v[6]}" "${v[7]}" \
      "${R[storm|$sys|$run|note]}$([ "${v[8]}" = 0 ] || echo "  !! ${v[8]} wrong or missing answers")$(flag)"
  done
done

if [ "$ACCESS_LOG" = on ]; then
  sleep 2 # nginx flushes its buffer every second
  printf '  access log lines written: cdn-edge %d, nginx %d, varnish %d\n' \
    "$(grep -c '"target":"access"' "$work/cdn-edge.log" || true)" \
    "$(wc -l 2>/dev/null <"$work/nginx-access.log" || echo 0)" "$(wc -l 2>/dev/null <"$work/varnish-access.log" || echo 0)"
fi
if [ "$PIN" = 1 ]; then
  echo "  affinity after the runs (threads started since included):"
  pin_bad=0
  check_all_pinned
fi
echo

# ---------------------------------------------------------------- tables
stats() { # workload system field: "median lowest highest" over the runs
  local r v
  for ((r = 1; r <= RUNS; r++)); do
    read -ra v <<<"${R[$1|$2|$r]}"
    echo "${v[$3]}"
  done | sort -g | awk '{ v[NR] = $1 } END {
    m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
cell() { local s; read -ra s <<<"$(stats "$@")"; echo "${s[0]}"; } # the median alone
med() { awk -v f="$1" -v m="$(cell "$2" "$3" "$4")" 'BEGIN { printf f "\n", m }'; } # printf-format workload system field
spread() { # printf-format workload system field: "median (lowest-highest)", or the median
  # alone when every run gave the same
  local s
  read -ra s <<<"$(stats "$2" "$3" "$4")"
  awk -v f="$1" -v m="${s[0]}" -v lo="${s[1]}" -v hi="${s[2]}" 'BEGIN {
    a = sprintf(f, m); l = sprintf(f, lo); h = sprintf(f, hi)
    if (l == h) print a; else print a " (" l "-" h ")" }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
bound_count() { # workload system: "n of RUNS" runs load-bound, or "-" unpinned
  local r v n=0
  [ "$PIN" = 1 ] || { echo "-"; return; }
  for ((r = 1; r <= RUNS; r++)); do read -ra v <<<"${R[$1|$2|$r]}"; n=$((n + v[10])); done
  echo "$n of $RUNS"
}
hits_fmt='%-27s %-21s %-20s %-22s %-12s %-12s %-12s %6s %6s %7s %7s  %s\n'
table() { # workload reference-system systems...: one row per system, cpu per request first
  local wl=$1 ref=$2
  shift 2
  # shellcheck disable=SC2059 # one format for the header and the rows
  printf "$hits_fmt" system "cpu us/req" "req/s" "p99 ms" "cpu ratio" "req/s ratio" "p99 ratio" "p50 ms" "MB/s" "wrk us" "core %" load-bound
  local sys c rq p99 ref_c ref_rq ref_p99 path_c path_rq path_p99 cr rr pr
  ref_c=$(cell "$wl" "$ref" 6) ref_rq=$(cell "$wl" "$ref" 0) ref_p99=$(cell "$wl" "$ref" 3)
  if [ "$wl" = range ]; then path_c=$(cell range cdn-path 6) path_rq=$(cell range cdn-path 0) path_p99=$(cell range cdn-path 3); fi
  for sys in "$@"; do
    c=$(cell "$wl" "$sys" 6) rq=$(cell "$wl" "$sys" 0) p99=$(cell "$wl" "$sys" 3)
    cr="-" rr="-" pr="-"
    if [[ "$sys" != cdn* ]]; then
      cr=$(ratio "$ref_c" "$c") rr=$(ratio "$ref_rq" "$rq") pr=$(ratio "$ref_p99" "$p99")
      if [ "$wl" = range ]; then
        cr="$cr ($(ratio "$path_c" "$c"))" rr="$rr ($(ratio "$path_rq" "$rq"))" pr="$pr ($(ratio "$path_p99" "$p99"))"
      fi
    fi
    # shellcheck disable=SC2059 # one format for the header and the rows
    printf "$hits_fmt" "$(label "$sys" "$wl")" "$(spread %.1f "$wl" "$sys" 6)" "$(spread %.0f "$wl" "$sys" 0)" \
      "$(spread %.2f "$wl" "$sys" 3)" "$cr" "$rr" "$pr" "$(med %.2f "$wl" "$sys" 2)" "$(med %.0f "$wl" "$sys" 1)" \
      "$(med %.1f "$wl" "$sys" 7)" "$(med %.0f "$wl" "$sys" 8)/$(med %.0f "$wl" "$sys" 9)" "$(bound_count "$wl" "$sys")"
  done
}
runs_note="median of $RUNS run(s)"
if [ "$PIN" = 1 ]; then pin_note="servers on cpu $SERVER_CPU, one worker each; wrk -t1 on cpu $LOAD_CPU"
else pin_note="unpinned; wrk -t$WRK_THREADS"; fi
echo "== results ($runs_note; $pin_note; -c$CONNS -d${SECS}s; access log $ACCESS_LOG)"
if [ "$disturbed" -gt 0 ]; then
  echo "!! $disturbed of the $timed timed runs shared the cpus with other work (over 5%, flagged above):"
  echo "!! those numbers are low; rerun on an idle machine."
elif [ "$PIN" = 1 ]; then
  echo "Other work took at most 5% of cpu $SERVER_CPU and of cpu $LOAD_CPU during every one of the $timed timed runs."
else
  echo "Other work took at most 5% of the cpus during every one of the $timed timed runs."
fi
if [ "$PIN" = 1 ]; then
  [ "$pin_bad" = 0 ] && [ "$load_pin_bad" = 0 ] || echo "!! some processes were not on their cpu (see above): the figures are not per core."
  lb_summary=""
  for g in cdn nginx varnish; do
    n=0 total=0
    for key in "${!R[@]}"; do
      [[ "$key" == *\|note ]] && continue
      [[ "$key" == storm\|* ]] && continue
      sys=${key#*|} sys=${sys%%|*}
      [ "$(group_of "$sys")" = "$g" ] || continue
      read -ra v <<<"${R[$key]}"
      n=$((n + v[10])) total=$((total + 1))
    done
    case $g in cdn) name=cdn-edge ;; *) name=$g ;; esac
    lb_summary="$lb_summary${lb_summary:+, }$name $n of $total"
  done
  echo "Load-bound runs (wrk used >= 90% of cpu $LOAD_CPU while the server used < 90% of cpu $SERVER_CPU:"
  echo "wrk, not the server, set the pace; the server's cpu per request still holds): $lb_summary."
else
  echo "Load-bound runs are told apart only with PIN=1 (one core each for the server and wrk)."
fi
echo
echo "cpu us/req = the server's own cpu time (all its threads and worker processes) per request, in"
echo "microseconds: what a request costs it however much cpu wrk leaves it. The first figure of a"
echo "cell is the median of the runs, (lowest-highest) beside it; the other columns are medians."
echo "cpu ratio = cdn-edge cpu / that system's (below 1: cdn-edge spends less per request);"
echo "req/s ratio = cdn-edge req/s / that system's (above 1: cdn-edge serves more);"
echo "p99 ratio = cdn-edge p99 / that system's (below 1: cdn-edge's tail is shorter)."
echo "MB/s counts every byte wrk read (headers too), in 10^6 bytes. wrk us = wrk's cpu time per request"
echo "(with one thread it tops out at 1e6/wrk us req/s). core % = the share of its core the server / wrk"
if [ "$PIN" = 1 ]; then
  echo "used (cpu $SERVER_CPU / cpu $LOAD_CPU) during the run; load-bound: runs where wrk, not the server, was the limit."
else
  echo "used, in % of one cpu (unpinned: the server may use more than one)."
fi
echo
echo "1. random 310,491-byte range hits of the warm $((SIZE / 1048576)) MiB object (same seeded sequence for all;$([ "$STORAGE" = disk ] && echo " from DISK:")"
echo "   ratios against cdn-edge's / + Range form, the same request the peers get; (...) against /range/a-b)"
table range cdn-header "${range_systems[@]}"
echo
echo "2. the same range hits over HTTPS ($cdn_proto $cdn_cipher, key exchange $cdn_group; HTTP/1.1;"
echo "   one connection per wrk connection, so one handshake each); cdn-edge / + Range and nginx"
table https cdn-https "${https_systems[@]}"
printf '%-27s %s\n' "varnish" "not measured: Varnish Cache (open source) has no TLS (a TLS proxy such as hitch goes in front)"
echo
echo "3. dictionary hits: GET $DICT_URI (${#DICT_JSON}-char, $(printf '%s' "$DICT_JSON" | wc -c)-byte JSON)"
table dict cdn-edge "${dict_systems[@]}"
echo
echo "4. cold-miss storm: $STORM concurrent requests (curl --parallel, one connection each) for distinct"
echo "   310,491-byte ranges $step bytes apart over a version none has cached ($storm_slices distinct 1 MiB slices);"
echo "   cdn-edge via /range/a-b, nginx and Varnish via Range. Every answer checked (status, length, bytes)."
echo "   cpu us/req: the server's cpu from the first request until the origin's fills ended, / $STORM"
echo "   (counted in clock ticks of $((1000 / hz)) ms: steps of $((1000000 / hz / STORM)) us/req here);"
echo "   req/s: $STORM / the time until the last answer."
storm_fmt='%-27s %-17s %-16s %-22s %-10s %-10s %8s %8s %8s %10s %10s\n'
# shellcheck disable=SC2059 # one format for the header and the rows
printf "$storm_fmt" system "cpu us/req" req/s "p99 ms" "cpu ratio" "time ratio" "all ms" "p50 ms" "max ms" "origin req" "origin MB"
for sys in "${dict_systems[@]}"; do
  c=$(cell storm "$sys" 0) all_ms=$(cell storm "$sys" 3)
  if [ "$sys" = cdn-edge ]; then cdn_c=$c cdn_all=$all_ms cr="-" tr="-"
  else cr=$(ratio "$cdn_c" "$c") tr=$(ratio "$cdn_all" "$all_ms"); fi
  # shellcheck disable=SC2059
  printf "$storm_fmt" "$(label "$sys")" "$(spread %.0f storm "$sys" 0)" "$(spread %.0f storm "$sys" 1)" \
    "$(spread %.1f storm "$sys" 2)" "$cr" "$tr" "$(med %.0f storm "$sys" 3)" "$(med %.1f storm "$sys" 4)" \
    "$(med %.1f storm "$sys" 5)" "$(med %.0f storm "$sys" 6)" "$(med %.1f storm "$sys" 7)"
done
echo "(time ratio = cdn-edge's completion time / that system's: below 1, cdn-edge finished sooner."
echo " Slices touched: $storm_slices. cdn-edge and nginx should ask the origin once per slice; Varnish"
echo " strips Range on a miss and fetches the whole $((SIZE / 1048576)) MiB object once, serving every range from it.)"
echo
echo "total time: $(($(date +%s) - started)) s"
