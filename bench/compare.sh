#!/usr/bin/env bash
# Side-by-side load test of cdn-edge, nginx and Varnish as video edges, on this machine,
# in one run, against one shared origin.
#
# Usage: [SECS=10] [RUNS=1] [CONNS=32] [ACCESS_LOG=off|on] [CACHE_MB=2048] [BUILD=1] \
#        [EDGE_THREADS=0] [EDGE_SENDFILE=true] [WRK_THREADS=1] bench/compare.sh
#
#   SECS        seconds per wrk run                        RUNS      repeats of every workload
#   CONNS       wrk connections (1 thread)                 CACHE_MB  memory cache of each edge
#   ACCESS_LOG  off: no access log anywhere; on: buffered access log on all three
#               (nginx buffer=64k flush=1s, cdn-edge's log thread, varnishncsa)
#   BUILD       1: cargo build --release first; 0: use target/release/cdn-edge as it is
#   SHOW_CONFIG 1: print the generated origin, nginx, Varnish and cdn-edge configs
#   EDGE_THREADS  cdn-edge [server] threads (default 0: one per cpu, as nginx's
#               worker_processes auto)
#   EDGE_SENDFILE  cdn-edge cache.sendfile (default true: warm slices leave by sendfile
#               from its page pool; false: copied into the socket, as Varnish does)
#   WRK_THREADS wrk threads (default 1; with one, wrk itself limits range hits at
#               about 3.5 GB/s on a 2-cpu machine)
#   QUIET_WAIT  before each timed run, wait up to this many seconds (default 60) for the
#               machine to be idle; each run reports the cpu share other work took during it
#
# What runs (everything on 127.0.0.1:18080-18085, in the foreground of this script, with
# config, pid and log files in a temp dir):
#   origin     nginx: a 256 MiB object (deterministic bytes) at /objects/{o}/{v} for any
#              o and v, with byte ranges; a 74-byte JSON at /base_dict_getHoverDict_8
#              (Cache-Control: max-age=86400). Its access log counts origin requests.
#   cdn-edge   slice 1 MiB, memory tier CACHE_MB, no disk tier, threads = EDGE_THREADS,
#              sendfile = EDGE_SENDFILE.
#   nginx      secure_link (MD5 of expiry + URI + secret, 403/410), slice 1m, proxy_cache
#              on tmpfs with proxy_cache_lock, keepalive to the origin, worker_processes auto.
#   Varnish    malloc storage of CACHE_MB, builtin VCL (caches by URL), unsigned URLs.
# Workloads (wrk -tWRK_THREADS -cCONNS -dSECS --latency, bench/wrk/compare.lua): random 310,491-byte
# range hits, dictionary hits; then a cold-miss storm: 100 concurrent requests (curl
# --parallel) for distinct ranges of a version no edge has cached, with the origin
# requests it caused. Every cell is the median of RUNS runs; each run's numbers are
# printed too. Installs nginx, varnish and wrk from the distribution if missing (as root,
# with service start-up suppressed; services the install registered are stopped and
# disabled). Needs about 3 x CACHE_MB + 1 GiB of free memory.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

SECS=${SECS:-10}
RUNS=${RUNS:-1}
CONNS=${CONNS:-32}
ACCESS_LOG=${ACCESS_LOG:-off}
CACHE_MB=${CACHE_MB:-2048}
BUILD=${BUILD:-1}
SHOW_CONFIG=${SHOW_CONFIG:-0}
QUIET_WAIT=${QUIET_WAIT:-60}
EDGE_THREADS=${EDGE_THREADS:-0}
WRK_THREADS=${WRK_THREADS:-1}
EDGE_SENDFILE=${EDGE_SENDFILE:-true}
case "$EDGE_SENDFILE" in true | false) ;; *) echo "EDGE_SENDFILE must be true or false" >&2; exit 2 ;; esac
case "$ACCESS_LOG" in on | off) ;; *) echo "ACCESS_LOG must be on or off" >&2; exit 2 ;; esac
[[ "$WRK_THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "WRK_THREADS: a positive number" >&2; exit 2; }
[[ "$EDGE_THREADS" =~ ^[0-9]+$ ]] || { echo "EDGE_THREADS: a number (0: one per cpu)" >&2; exit 2; }
for n in "$SECS" "$RUNS" "$CONNS" "$CACHE_MB"; do
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "SECS, RUNS, CONNS, CACHE_MB: positive integers" >&2; exit 2; }
done

ORIGIN=127.0.0.1:18080 CDN=127.0.0.1:18081 CDN_ADMIN=127.0.0.1:18082
NGINX=127.0.0.1:18083 VARNISH=127.0.0.1:18084 VARNISH_ADMIN=127.0.0.1:18085
SIZE=268435456 LEN=310491 SLICE=1048576 STORM=100
SECRET=compare-secret-3f1c OBJ=movie VER=v1
DICT_PATH=/base_dict_getHoverDict_8
DICT_URI="$DICT_PATH?form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n"
DICT_JSON='{"form":"어","lemma":"어","pos":"NOUN","sl":"ko","tl":"en","gloss":"uh"}'
bin=target/release/cdn-edge
lua=bench/wrk/compare.lua

work=$(mktemp -d /tmp/cdn-compare.XXXXXX)
if [ -d /dev/shm ] && [ -w /dev/shm ]; then shm=$(mktemp -d /dev/shm/cdn-compare.XXXXXX); else shm=$work/shm; fi
mkdir -p "$work"/{origin,tmp,storm} "$shm"
pids=()            # daemons started here, stopped by pid at exit
policy=/usr/sbin/policy-rc.d
policy_state=none  # none | created | replaced

restore_policy() {
  case "$policy_state" in
    created) rm -f "$policy" ;;
    replaced) cp -p "$work/policy-rc.d.saved" "$policy" ;;
  esac
  policy_state=none
}

stop_pid() { # pid signal: signal, wait up to 10 s, then SIGKILL it and its children
  local pid=$1 sig=$2 kids
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  for k in $kids; do kill -0 "$k" 2>/dev/null && kill -KILL "$k" 2>/dev/null; done
  return 0
}

cleanup() {
  local rc=$?
  set +e
  restore_policy
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    # "pid:signal": cdn-edge stops at once on SIGINT, nginx and varnishd on SIGTERM
    stop_pid "${pids[i]%%:*}" "${pids[i]##*:}"
  done
  rm -rf "$work" "$shm"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() { echo "compare: $*" >&2; exit 1; }

# ---------------------------------------------------------------- tools
install_missing() {
  local pkgs=()
  [ -x /usr/sbin/nginx ] || pkgs+=(nginx)
  [ -x /usr/sbin/varnishd ] || pkgs+=(varnish)
  command -v wrk >/dev/null || pkgs+=(wrk)
  [ ${#pkgs[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${pkgs[*]}: run as root to install them (apt-get)"
  echo "installing ${pkgs[*]} (service start-up suppressed)"
  # policy-rc.d exiting 101 stops invoke-rc.d and deb-systemd-invoke from starting the
  # packages' services; an existing policy is put back afterwards.
  if [ -e "$policy" ]; then cp -p "$policy" "$work/policy-rc.d.saved"; policy_state=replaced
  else policy_state=created; fi
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 \
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  restore_policy
  local units=() p
  for p in "${pkgs[@]}"; do
    case $p in nginx) units+=(nginx.service) ;; varnish) units+=(varnish.service varnishncsa.service) ;; esac
  done
  if [ ${#units[@]} -gt 0 ] && [ -d /run/systemd/system ]; then
    timeout 60 systemctl disable --now "${units[@]}" >/dev/null 2>&1 || true
  fi
  # Without systemd: a service started anyway would have written its pid file.
  for p in "${pkgs[@]}"; do
    case $p in nginx) f=/run/nginx.pid ;; varnish) f=/run/varnishd.pid ;; *) continue ;; esac
    if [ -s "$f" ]; then kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
  done
}
install_missing
nginx_v=$(/usr/sbin/nginx -V 2>&1)
for m in http_slice_module http_secure_link_module; do
  grep -q -- "--with-$m" <<<"$nginx_v" || die "this nginx lacks $m (nginx -V); Debian's nginx package has it"
done
command -v openssl >/dev/null || die "openssl is missing"
curl --help all 2>/dev/null | grep -q -- --parallel-immediate || die "curl >= 7.68 is needed (--parallel)"

if [ "$BUILD" = 1 ]; then timeout 3600 cargo build --release --quiet; fi
[ -x "$bin" ] || die "$bin is missing: cargo build --release"

for p in 18080 18081 18082 18083 18084 18085; do
  [ -z "$(ss -Hltn "sport = :$p")" ] || die "127.0.0.1:$p is in use; this script needs 18080-18085"
done

# ---------------------------------------------------------------- machine
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain -- src benches Cargo.toml Cargo.lock 2>/dev/null)" ]; then
  commit="$commit (plus uncommitted changes in src/)"
fi
echo "== machine"
echo "cpus:      $(nproc) ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'))"
echo "memory:    $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
echo "kernel:    $(uname -sr)"
echo "os:        $(. /etc/os-release && echo "$PRETTY_NAME")"
echo "nginx:     $(/usr/sbin/nginx -v 2>&1 | sed 's/^nginx version: //') ($(dpkg-query -W -f='${Version}' nginx 2>/dev/null || echo '?'))"
echo "varnish:   $(/usr/sbin/varnishd -V 2>&1 | head -1 | sed 's/^varnishd (\(.*\))$/\1/')"
echo "wrk:       $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
echo "curl:      $(curl --version | head -1 | awk '{print $2}')"
echo "cdn-edge:  $("$bin" --version | awk '{print $2}'), commit $commit"
echo "date:      $(date -u +%FT%TZ)"
echo
echo "== setup"
echo "load:       wrk -t$WRK_THREADS -c$CONNS -d${SECS}s --latency, $RUNS run(s), medians; wrk and the servers share the $(nproc) cpus"
echo "threads:    cdn-edge $([ "$EDGE_THREADS" = 0 ] && echo "one per cpu ($(nproc))" || echo "$EDGE_THREADS"), nginx one worker per cpu, Varnish its default pools"
echo "sendfile:   cdn-edge $([ "$EDGE_SENDFILE" = true ] && echo "from its page pool (cache.sendfile = true)" || echo "off: copies into the socket"); nginx sendfile on (tmpfs cache); Varnish copies"
if [ "$ACCESS_LOG" = on ]; then
  echo "access log: ON everywhere: nginx access_log buffer=64k flush=1s, cdn-edge [log] access = true"
  echo "            (its writer thread), Varnish varnishncsa -w; all to files in a temp dir"
else
  echo "access log: OFF everywhere: nginx access_log off, cdn-edge [log] access = false, Varnish"
  echo "            without varnishncsa (its shared-memory log is always written)"
fi
echo "caches:     memory, $CACHE_MB MiB each: cdn-edge memory tier (no disk tier), nginx"
echo "            proxy_cache on tmpfs ($shm), Varnish -s malloc"
echo "signing:    cdn-edge HMAC-SHA256 (its own scheme); nginx secure_link MD5 of"
echo "            expiry + URI + secret (403 bad or missing, 410 expired); Varnish: none, the"
echo "            base package has no HMAC or secure-link module, so it serves unsigned URLs"
echo "slicing:    cdn-edge and nginx fetch 1 MiB slices; Varnish fetches the whole object"
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

user_line=""
[ "$(id -u)" = 0 ] && user_line="user root root;   # workers read and write only this run's temp dirs"
temp_paths="client_body_temp_path $work/tmp/body; proxy_temp_path $work/tmp/proxy;
  fastcgi_temp_path $work/tmp/fastcgi; uwsgi_temp_path $work/tmp/uwsgi; scgi_temp_path $work/tmp/scgi;"

cat >"$work/origin.conf" <<EOF
$user_line
worker_processes auto;
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
    location ~ ^/objects/[^/]+/[^/]+\$ {
      root $work/origin;
      try_files /object.bin =404;
      default_type video/mp4;
      add_header Cache-Control "public, max-age=31536000, immutable";
    }
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
worker_processes auto;
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
  proxy_cache_path $shm/video levels=1:2 keys_zone=video:64m max_size=${CACHE_MB}m inactive=1d use_temp_path=off;
  proxy_cache_path $shm/dict levels=1:2 keys_zone=dict:8m max_size=64m inactive=1d use_temp_path=off;
  upstream origin {
    server $ORIGIN;
    keepalive 64;
  }
  server {
    listen $NGINX reuseport;
    location ~ ^/objects/[^/]+/[^/]+\$ {
      secure_link \$arg_md5,\$arg_expires;
      secure_link_md5 "\$secure_link_expires\$uri $SECRET";
      if (\$secure_link = "") { return 403; }
      if (\$secure_link = "0") { return 410; }
      slice 1m;
      proxy_cache video;
      proxy_cache_key \$uri\$slice_range;
      proxy_cache_valid 200 206 1d;
      proxy_cache_lock on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Range \$slice_range;
      proxy_pass http://origin;
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

# ---------------------------------------------------------------- cdn-edge
cat >"$work/edge.toml" <<EOF
[listen]
http = "$CDN"
admin = "$CDN_ADMIN"

[signing]
clock_skew_secs = 30
[[signing.keys]]
id = "k1"
secret = "$SECRET"

[cache]
slice_bytes = $SLICE
memory_bytes = $((CACHE_MB * 1048576))
sendfile = $EDGE_SENDFILE

[origin]
urls = ["http://$ORIGIN"]
path = "/objects/{o}/{v}"

[dictionary]
paths = ["$DICT_PATH"]
upstream = "http://$ORIGIN"

[server]
threads = $EDGE_THREADS
grace_period_secs = 1
shutdown_timeout_secs = 1
upgrade_sock = "$work/upgrade.sock"

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
wait_http() { # name url: until it answers (any status), up to 15 s
  for _ in $(seq 1 150); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$2" || true)" != 000 ] && return 0
    sleep 0.1
  done
  die "$1 did not start; its log is in $work (kept until exit)"
}
/usr/sbin/nginx -p "$work/" -e "$work/origin-error.log" -c "$work/origin.conf" &
pids+=("$!:TERM")
/usr/sbin/nginx -p "$work/" -e "$work/nginx-edge-error.log" -c "$work/nginx-edge.conf" &
pids+=("$!:TERM")
/usr/sbin/varnishd -F -j none -a "$VARNISH" -T "$VARNISH_ADMIN" -n "$work/varnish" \
  -f "$work/varnish.vcl" -s "malloc,${CACHE_MB}M" -P "$work/varnish.pid" \
  >"$work/varnish.log" 2>&1 &
pids+=("$!:TERM")
"$bin" serve --conf "$work/edge.toml" >"$work/cdn-edge.log" 2>&1 &
pids+=("$!:INT")
wait_http origin "http://$ORIGIN/"
wait_http nginx "http://$NGINX/"
wait_http varnish "http://$VARNISH/"
wait_http cdn-edge "http://$CDN_ADMIN/healthz"
if [ "$ACCESS_LOG" = on ]; then
  varnishncsa -n "$work/varnish" -w "$work/varnish-access.log" &
  pids+=("$!:TERM")
fi

# ---------------------------------------------------------------- URLs
ttl=$((3600 + RUNS * SECS * 10))
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
# once per slice, Varnish once in all.
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
echo

# ---------------------------------------------------------------- load runs
declare -A R # "workload|system|run" -> "req_s mb_s p50_ms p99_ms non2xx socket_errors"
range_systems=(cdn-path cdn-header nginx varnish)
dict_systems=(cdn-edge nginx varnish)
label() { # system [workload]
  case $1 in
    cdn-path) echo "cdn-edge /range/a-b" ;;
    cdn-header) echo "cdn-edge / + Range" ;;
    cdn-edge) echo "cdn-edge" ;;
    nginx) [ "${2:-}" = dict ] && echo "nginx (proxy_cache)" || echo "nginx (secure_link, slice)" ;;
    varnish) [ "${2:-}" = dict ] && echo "varnish" || echo "varnish (unsigned)" ;;
  esac
}
server_pid() { # system: the pid of its main process
  case $1 in
    nginx) echo "${pids[1]%%:*}" ;;
    varnish) echo "${pids[2]%%:*}" ;;
    cdn*) echo "${pids[3]%%:*}" ;;
  esac
}
server_ticks() { # pid: user+system cpu ticks of it (all threads) and its worker processes
  local files=("/proc/$1/stat") k
  for k in $(ps -o pid= --ppid "$1" 2>/dev/null); do files+=("/proc/$k/stat"); done
  cat "${files[@]}" 2>/dev/null | awk '{ sub(/^.*\) /, ""); s += $12 + $13 } END { print s + 0 }'
}
child_ticks() { # user+system cpu ticks of this script's finished children (wrk)
  awk '{ sub(/^.*\) /, ""); print $14 + $15 }' /proc/$$/stat
}
hz=$(getconf CLK_TCK)
run_wrk() { # key url [env...]: runs wrk and stores the parsed result under key
  local key=$1 url=$2 out spid t0 t1 w0 w1
  shift 2
  spid=$(server_pid "$(cut -d'|' -f2 <<<"$key")")
  t0=$(server_ticks "$spid") w0=$(child_ticks)
  out=$(env "$@" timeout $((SECS + 60)) wrk -t"$WRK_THREADS" -c"$CONNS" -d"${SECS}s" --timeout 5s --latency -s "$lua" "$url" || true)
  t1=$(server_ticks "$spid") w1=$(child_ticks)
  # The last two fields: the server's and wrk's cpu time per request, in microseconds.
  R[$key]=$(awk -v ticks=$((t1 - t0)) -v wticks=$((w1 - w0)) -v hz="$hz" '/^RESULT/ {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      d = v["duration_us"] / 1e6
      n = v["requests"] > 0 ? v["requests"] : 1
      printf "%.0f %.0f %.2f %.2f %d %d %.1f %.1f\n", v["requests"] / d, v["bytes"] / d / 1e6,
        v["p50_us"] / 1000, v["p99_us"] / 1000, v["non2xx"], v["socket_errors"],
        ticks / hz * 1e6 / n, wticks / hz * 1e6 / n
    }' <<<"$out")
  [ -n "${R[$key]}" ] || { echo "$out" >&2; die "wrk gave no result for $key"; }
}
rotate() { # n items...: the items rotated left by n
  local n=$1
  shift
  local a=("$@") i
  for ((i = 0; i < ${#a[@]}; i++)); do echo "${a[(i + n) % ${#a[@]}]}"; done
}
# Other work on the machine skews every number here. Before each timed run the script
# waits (up to QUIET_WAIT s) for the cpus to be idle, and during it measures how much cpu
# went to anything other than the servers, the load generator and this script.
cpu_ticks() { # user+nice+system+steal ticks of all cpus, and all ticks
  awk '/^cpu / { print $2 + $3 + $4 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 }' /proc/stat
}
own_ticks() { # user+system ticks of the servers (and their worker processes) and of the
  # finished children of this script (wrk, curl)
  local p files=(/proc/$$/stat)
  for ((p = 0; p < ${#pids[@]}; p++)); do
    files+=("/proc/${pids[p]%%:*}/stat")
    for k in $(ps -o pid= --ppid "${pids[p]%%:*}" 2>/dev/null); do files+=("/proc/$k/stat"); done
  done
  cat "${files[@]}" 2>/dev/null | awk -v self=$$ '{ pid = $1; sub(/^.*\) /, "")
    s += $12 + $13; if (pid == self) s += $14 + $15 } END { print s + 0 }'
}
other_pct() { # busy-ticks total-ticks own-ticks, from before: % of the cpus other work used since
  local c0=$1 c1 o0=$3 o1
  c1=$(cpu_ticks) o1=$(own_ticks)
  awk -v c0="$c0" -v t0="$2" -v c1="${c1% *}" -v t1="${c1#* }" -v o0="$o0" -v o1="$o1" 'BEGIN {
    t = t1 - t0; x = (c1 - c0) - (o1 - o0); if (x < 0) x = 0
    printf "%d\n", (t > 0 ? 100 * x / t : 0) }'
}
busy=0 other=0 disturbed=0
quiet() { # waits until the cpus are idle (other work under 10% for 1 s), up to QUIET_WAIT s
  local c0 t0 o0 waited=0
  while :; do
    read -r c0 t0 <<<"$(cpu_ticks)"
    o0=$(own_ticks)
    sleep 1
    busy=$(other_pct "$c0" "$t0" "$o0")
    [ "$busy" -le 10 ] || [ "$waited" -ge "$QUIET_WAIT" ] && break
    waited=$((waited + 1))
  done
  read -ra mark <<<"$(cpu_ticks) $(own_ticks)" # the timed run starts now
}
measured() { # after a timed run: % of the cpus that went to other work during it
  other=$(other_pct "${mark[0]}" "${mark[1]}" "${mark[2]}")
  if [ "$other" -gt 5 ]; then disturbed=$((disturbed + 1)); fi
}
flag() {
  [ "$other" -gt 5 ] && printf '  !! other work took %d%% of the cpus' "$other"
  return 0
}
raw_line() { # workload system run
  local v warn=""
  read -ra v <<<"${R[$1|$2|$3]}"
  [ "${v[4]}" != 0 ] || [ "${v[5]}" != 0 ] && warn="  !! non-2xx ${v[4]}, socket errors ${v[5]}"
  warn="$warn$(flag)"
  printf '  run %d  %-27s %9s req/s %7s MB/s  p50 %7s ms  p99 %7s ms  cpu %6s + wrk %6s us/req%s\n' "$3" "$(label "$2" "$1")" "${v[0]}" "${v[1]}" "${v[2]}" "${v[3]}" "${v[6]}" "${v[7]}" "$warn"
}

# cold-miss storm: STORM requests for distinct ranges spread evenly over a version that
# no edge has cached yet (a new v per system and run; the origin serves any v).
step=$(((SIZE - LEN) / (STORM - 1)))
storm_slices=$(awk -v n=$STORM -v s=$step -v l=$LEN -v z=$SLICE 'BEGIN {
  for (i = 0; i < n; i++) { a = i * s; for (k = int(a / z); k <= int((a + l - 1) / z); k++) seen[k] = 1 }
  for (k in seen) c++; print c }')
declare -A S # "system|run" -> "wall_ms p50_ms max_ms origin_requests origin_mb bad"
storm() { # system run
  local sys=$1 run=$2 ver="storm-r$2-$1" dir="$work/storm/$1-$2" cfg i a b url hdr q
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
      echo "write-out = \"%{http_code} %{size_download} %{time_total} $i $a\\n\""
    } >>"$cfg"
  done
  local t0 t1
  t0=$(date +%s%N)
  timeout 120 curl -s -K "$cfg" >"$dir/out" 2>/dev/null || true
  t1=$(date +%s%N)
  # every answer: the right status, length and bytes
  local want=206 nbad=0 code size idx start ref sum
  [ "$sys" = cdn-edge ] && want=200
  while read -r code size _ idx start; do
    ref=$(dd if="$work/origin/object.bin" iflag=skip_bytes,count_bytes skip="$start" count="$LEN" status=none | md5sum)
    sum=$(md5sum <"$dir/$idx")
    if [ "$code" != "$want" ] || [ "$size" != "$LEN" ] || [ "$sum" != "$ref" ]; then nbad=$((nbad + 1)); fi
  done <"$dir/out"
  local answered
  answered=$(wc -l <"$dir/out")
  nbad=$((nbad + STORM - answered))
  local stats
  stats=$(awk '{print $3}' "$dir/out" | sort -g | awk '{ t[NR] = $1 } END { printf "%.1f %.1f", t[int((NR + 1) / 2)] * 1000, t[NR] * 1000 }')
  local last=-1 cur
  for _ in $(seq 1 50); do # until the origin's log has caught up with fetches still streaming
    cur=$(origin_lines)
    [ "$cur" = "$last" ] && break
    last=$cur
    sleep 0.2
  done
  read -r oreq obytes < <(origin_count "/objects/$OBJ/$ver")
  S[$sys|$run]="$(((t1 - t0) / 1000000)) $stats $oreq $(awk -v b="$obytes" 'BEGIN { printf "%.1f", b / 1e6 }') $nbad"
  rm -rf "$dir"
}

echo "== load runs"
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
    measured
    raw_line range "$sys" "$run"
  done
  for sys in $(rotate $((run - 1)) "${dict_systems[@]}"); do
    case $sys in
      cdn-edge) url="http://$CDN$DICT_URI" ;;
      nginx) url="http://$NGINX$DICT_URI" ;;
      varnish) url="http://$VARNISH$DICT_URI" ;;
    esac
    quiet
    run_wrk "dict|$sys|$run" "$url" MODE=fixed
    measured
    raw_line dict "$sys" "$run"
  done
  during=$(($(origin_lines) - before))
  echo "  run $run  origin requests during the hit workloads: $during (want 0)"
  for sys in $(rotate $((run - 1)) "${dict_systems[@]}"); do
    quiet
    storm "$sys" "$run"
    measured
    read -r w p m o mb nb <<<"${S[$sys|$run]}"
    printf '  run %d  %-27s storm: all %d done in %6d ms  p50 %7s ms  max %7s ms  origin %4d requests, %7s MB%s\n' \
      "$run" "$(label "$sys")" "$STORM" "$w" "$p" "$m" "$o" "$mb" \
      "$([ "$nb" = 0 ] || echo "  !! $nb wrong or missing answers")$(flag)"
  done
done

if [ "$ACCESS_LOG" = on ]; then
  sleep 2 # nginx flushes its buffer every second
  printf '  access log lines written: cdn-edge %d, nginx %d, varnish %d\n' \
    "$(grep -c '"target":"access"' "$work/cdn-edge.log" || true)" \
    "$(cat "$work/nginx-access.log" 2>/dev/null | wc -l)" "$(cat "$work/varnish-access.log" 2>/dev/null | wc -l)"
fi
echo

# ---------------------------------------------------------------- tables
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.6g\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
cell() { # workload system field -> median over the runs
  local r
  for ((r = 1; r <= RUNS; r++)); do
    local v
    read -ra v <<<"${R[$1|$2|$r]}"
    echo "${v[$3]}"
  done | median
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
table() { # workload reference-system systems...
  local wl=$1 ref=$2
  shift 2
  printf '%-28s %9s %8s %8s %8s %8s %8s   %-16s %-16s\n' system req/s MB/s "p50 ms" "p99 ms" "cpu us" "wrk us" "req/s ratio" "p99 ratio"
  local sys rq p99 ref_rq ref_p99 path_rq path_p99 rr pr
  ref_rq=$(cell "$wl" "$ref" 0) ref_p99=$(cell "$wl" "$ref" 3)
  if [ "$wl" = range ]; then path_rq=$(cell range cdn-path 0) path_p99=$(cell range cdn-path 3); fi
  for sys in "$@"; do
    rq=$(cell "$wl" "$sys" 0) p99=$(cell "$wl" "$sys" 3)
    rr="-" pr="-"
    if [[ "$sys" != cdn* ]]; then
      rr=$(ratio "$ref_rq" "$rq") pr=$(ratio "$ref_p99" "$p99")
      if [ "$wl" = range ]; then
        rr="$rr (path $(ratio "$path_rq" "$rq"))" pr="$pr (path $(ratio "$path_p99" "$p99"))"
      fi
    fi
    printf '%-28s %9s %8s %8s %8s %8s %8s   %-16s %-16s\n' "$(label "$sys" "$wl")" "$rq" "$(cell "$wl" "$sys" 1)" \
      "$(cell "$wl" "$sys" 2)" "$p99" "$(cell "$wl" "$sys" 6)" "$(cell "$wl" "$sys" 7)" "$rr" "$pr"
  done
}
runs_note="median of $RUNS run(s)"
echo "== results ($runs_note; wrk -t$WRK_THREADS -c$CONNS -d${SECS}s; access log $ACCESS_LOG)"
if [ "$disturbed" -gt 0 ]; then
  echo "!! $disturbed of the $((RUNS * 10)) timed runs shared the cpus with other work (over 5%, flagged above):"
  echo "!! those numbers are low; rerun on an idle machine."
else
  echo "Other work took at most 5% of the cpus during every timed run."
fi
echo "req/s ratio = cdn-edge req/s / that system's (above 1: cdn-edge serves more);"
echo "p99 ratio = cdn-edge p99 / that system's (below 1: cdn-edge's tail is shorter)."
echo "MB/s counts every byte wrk read (headers too), in 10^6 bytes."
echo "cpu us = the server's own cpu time (all its threads and worker processes) per request, in"
echo "microseconds: what it costs regardless of how much cpu wrk leaves it; wrk us = the same"
echo "for wrk, which reads every response on the same cpus (with one thread it tops out at 1e6/wrk us req/s)."
echo
echo "1. random 310,491-byte range hits of the warm $((SIZE / 1048576)) MiB object (same seeded sequence for all;"
echo "   ratios against cdn-edge's / + Range form, the same request the peers get; (path ...) against /range/a-b)"
table range cdn-header "${range_systems[@]}"
echo
echo "2. dictionary hits: GET $DICT_URI (${#DICT_JSON}-char, $(printf '%s' "$DICT_JSON" | wc -c)-byte JSON)"
table dict cdn-edge "${dict_systems[@]}"
echo
echo "3. cold-miss storm: $STORM concurrent requests (curl --parallel, one connection each) for distinct"
echo "   310,491-byte ranges $step bytes apart over a version none has cached ($storm_slices distinct 1 MiB slices);"
echo "   cdn-edge via /range/a-b, nginx and Varnish via Range. Medians of $RUNS run(s); every answer checked (status, length, bytes)."
printf '%-28s %9s %8s %8s %10s %10s   %-10s\n' system "all ms" "p50 ms" "max ms" "origin req" "origin MB" "time ratio"
col() { # system field -> median over the runs of the storm
  local r v
  for ((r = 1; r <= RUNS; r++)); do read -ra v <<<"${S[$1|$r]}"; echo "${v[$2]}"; done | median
}
for sys in "${dict_systems[@]}"; do
  w=$(col "$sys" 0)
  [ "$sys" = cdn-edge ] && cdn_w=$w
  tratio="-"
  [ "$sys" != cdn-edge ] && tratio=$(ratio "$cdn_w" "$w")
  printf '%-28s %9s %8s %8s %10s %10s   %-10s\n' "$(label "$sys")" "$w" "$(col "$sys" 1)" "$(col "$sys" 2)" \
    "$(col "$sys" 3)" "$(col "$sys" 4)" "$tratio"
done
echo "(time ratio = cdn-edge's completion time / that system's: below 1, cdn-edge finished sooner."
echo " Slices touched: $storm_slices. cdn-edge and nginx should ask the origin once per slice; Varnish"
echo " strips Range on a miss and fetches the whole $((SIZE / 1048576)) MiB object once, serving every range from it.)"
echo
echo "total time: $(($(date +%s) - started)) s"
