# shellcheck shell=bash
# shellcheck disable=SC2154 # `work` is the caller's
# Shared by the side-by-side scripts (bench/compare.sh, bench/hit-ratio.sh): installing nginx, Varnish and
# wrk without starting their services, and stopping what a script started.
# The caller sets `work` (its temp dir) and defines `die`.

peers_policy=/usr/sbin/policy-rc.d
peers_policy_state=none # none | created | replaced

peers_restore_policy() {
  case "$peers_policy_state" in
    created) rm -f "$peers_policy" ;;
    replaced) cp -p "$work/policy-rc.d.saved" "$peers_policy" ;;
  esac
  peers_policy_state=none
}

# peers_install PACKAGE...: apt-get installs the Debian packages named (nginx, varnish,
# wrk, python3, ...) that are missing, with their services kept from starting.
peers_install() {
  local pkgs=() p f
  for p in "$@"; do
    case $p in
      nginx) [ -x /usr/sbin/nginx ] || pkgs+=(nginx) ;;
      varnish) [ -x /usr/sbin/varnishd ] || pkgs+=(varnish) ;;
      *) command -v "$p" >/dev/null || pkgs+=("$p") ;;
    esac
  done
  [ ${#pkgs[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "missing ${pkgs[*]}: run as root to install them (apt-get)"
  echo "installing ${pkgs[*]} (service start-up suppressed)"
  # policy-rc.d exiting 101 stops invoke-rc.d and deb-systemd-invoke from starting the
  # packages' services; an existing policy is put back afterwards.
  if [ -e "$peers_policy" ]; then cp -p "$peers_policy" "$work/policy-rc.d.saved"; peers_policy_state=replaced
  else peers_policy_state=created; fi
  printf '#!/bin/sh\nexit 101\n' >"$peers_policy"
  chmod 755 "$peers_policy"
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 \
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  peers_restore_policy
  local units=()
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

# peers_stop PID SIGNAL: signal it, wait up to 10 s, then SIGKILL it and its children.
peers_stop() {
  local pid=$1 sig=$2 kids k
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  kill -"$sig" "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
  for k in $kids; do kill -0 "$k" 2>/dev/null && kill -KILL "$k" 2>/dev/null; done
  return 0
}

# peers_wait_http NAME URL: until it answers (any status), up to 15 s.
peers_wait_http() {
  for _ in $(seq 1 150); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$2" || true)" != 000 ] && return 0
    sleep 0.1
  done
  die "$1 did not start; its log is in $work"
}

# peers_nginx_slices: the directives of an nginx location that caches 1 MiB slices of
# the upstream `origin` in the proxy_cache zone `video`, as a video edge would.
peers_nginx_slices() {
  cat <<'EOF'
      slice 1m;
      proxy_cache video;
      proxy_cache_key $uri$slice_range;
      proxy_cache_valid 200 206 1d;
      proxy_cache_lock on;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Range $slice_range;
      proxy_pass http://origin;
EOF
}

# peers_nginx_paths WORK: sets user_line (root only: nginx's workers run as root, reading
# and writing only this run's temp dirs) and temp_paths (every nginx temp path under
# WORK/tmp) for the nginx configs a script writes.
peers_nginx_paths() {
  user_line=""
  [ "$(id -u)" = 0 ] && user_line="user root root;   # workers read and write only this run's temp dirs"
  temp_paths="client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi; uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;"
}

# peers_origin_object ROOT: the location of an origin nginx answering every
# /objects/{o}/{v} with ROOT/object.bin, immutable.
peers_origin_object() {
  cat <<EOF
    location ~ ^/objects/[^/]+/[^/]+\$ {
      root $1;
      try_files /object.bin =404;
      default_type video/mp4;
      add_header Cache-Control "public, max-age=31536000, immutable";
    }
EOF
}

# peers_edge_head HTTP ADMIN SECRET: the [listen] and [signing] sections of a cdn-edge
# under test (one HMAC key, k1).
peers_edge_head() {
  cat <<EOF
[listen]
http = "$1"
admin = "$2"

[signing]
[[signing.keys]]
id = "k1"
secret = "$3"
EOF
}

# peers_edge_quick_stop WORK: the [server] lines that let a cdn-edge under test stop
# within a second, with its upgrade socket under WORK.
peers_edge_quick_stop() {
  cat <<EOF
grace_period_secs = 1
shutdown_timeout_secs = 1
upgrade_sock = "$1/upgrade.sock"
EOF
}
