#!/usr/bin/env bash
# HTTP conformance check with REDbot (the HTTP linter, from PyPI) against `cdn-edge demo`.
# Usage: bench/redbot.sh            (exit 1 if REDbot rates any response BAD)
#        REDBOT_SHOW=all bench/redbot.sh   (print every note, not only WARN and BAD)
# Starts the demo on spare loopback ports, runs REDbot on the video routes (whole object
# with its range, conditional and caching checks; /range/), a dictionary lookup and the
# refusals, prints REDbot's notes and stops the demo by pid. Traffic goes to 127.0.0.1
# only. REDbot is installed into a virtualenv under target/redbot on first use (needs
# python3 and python3-venv; on Debian: apt-get install python3-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/redbot
if [ ! -x "$venv/bin/redbot" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet 'redbot>=2.7,<3'
fi
cargo build --release --quiet
bin=target/release/cdn-edge
http=127.0.0.1:28180 admin=127.0.0.1:29190
log=$(mktemp)
spool=$(mktemp -d)
"$bin" demo --http $http --admin $admin --origin 127.0.0.1:29100 --dictionary 127.0.0.1:29101 \
  --sink 127.0.0.1:29102 --spool "$spool" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$log" "$spool"' EXIT
for _ in $(seq 1 100); do
  curl -fs -o /dev/null "http://$admin/healthz" && break
  sleep 0.1
done
trailer=$(grep -a -o "?o=trailer[^']*" "$log" | head -1)
ranged=$(grep -a -o "/range/122638100-122948590?[^']*" "$log" | head -1)
dictionary=$(grep -a -o "/base_dict_getHoverDict_8?[^']*" "$log" | head -1)
expired=$(grep -a -o "/range/0-99?[^']*" "$log" | head -1)

bad=0
check() {
  local what="$1" url="$2" har
  har=$(mktemp)
  timeout 120 "$venv/bin/redbot" -o har "$url" >"$har"
  echo "== $what: $url"
  if ! python3 - "$har" "${REDBOT_SHOW:-}" <<'EOF'; then bad=1; fi
import json, sys
entries = json.load(open(sys.argv[1]))["log"]["entries"]
show_all = sys.argv[2] == "all"
bad = False
for entry in entries:
    print(f"   HTTP {entry['response']['status']}")
    for note in entry.get("_red_messages", []):
        level = note.get("level", "").upper()
        if show_all or level in ("WARN", "BAD"):
            print(f"   {level:5} {note.get('summary')}")
        bad = bad or level == "BAD"
sys.exit(1 if bad else 0)
EOF
  rm -f "$har"
}

check "whole object (Range, If-None-Match, If-Range)" "http://$http/$trailer"
check "range route" "http://$http$ranged"
check "dictionary lookup" "http://$http$dictionary"
check "expired URL (410)" "http://$http$expired"
check "unknown path (404)" "http://$http/nothing-here"
if [ "$bad" -ne 0 ]; then
  echo "redbot: at least one response was rated BAD" >&2
  exit 1
fi
echo "redbot: no response rated BAD"
