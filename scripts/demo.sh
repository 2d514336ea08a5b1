#!/usr/bin/env bash
# A small local shoal cluster on this one machine: two nodes on loopback, each with its own --home
# and --port under a temporary folder and a freshly generated shared cluster key. Waits until both
# are up, places the bundled model, prints the dashboard URL, and stops the nodes (by their pids)
# on Ctrl-C or exit.
#
#   scripts/demo.sh                        nodes on ports 52600 and 52601 (the next free ones if taken)
#   SHOAL_DEMO_NODES=3 scripts/demo.sh     more nodes
#   SHOAL_DEMO_PORT=8470 scripts/demo.sh   first port
#   SHOAL_DEMO_MODEL=none scripts/demo.sh  place nothing at start
#   SHOAL_BIN=/path/to/shoal scripts/demo.sh   another shoal command (default .venv/bin/shoal, else PATH)
#
# Expects scripts/setup.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=${SHOAL_DEMO_NODES:-2}
first_port=${SHOAL_DEMO_PORT:-52600}
model=${SHOAL_DEMO_MODEL:-smollm2-135m}
host=127.0.0.1
if [ -x .venv/bin/shoal ]; then shoal=.venv/bin/shoal; py=.venv/bin/python; else shoal=shoal; py=python3; fi
shoal=${SHOAL_BIN:-$shoal}
letters=(a b c d e f g h i j)
[ "$nodes" -ge 1 ] && [ "$nodes" -le ${#letters[@]} ] || { echo "demo: SHOAL_DEMO_NODES must be 1..${#letters[@]}" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/shoal-demo.XXXXXX")
pids=()

stop_all() {
  trap - EXIT INT TERM
  if [ ${#pids[@]} -gt 0 ]; then
    echo >&2
    echo "demo: stopping ${#pids[@]} node(s)…" >&2
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 1 40); do  # up to 8 s for a clean leave, then SIGKILL the stragglers
      alive=0
      for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ $alive = 0 ] && break
      sleep 0.2
    done
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  rm -rf "$work"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# GET a URL; prints the body, fails on anything but 2xx.
get() { "$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1"; }

# POST JSON; prints "<status> <body>" whatever the status.
post() {
  "$py" - "$1" "$2" <<'EOF'
import sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=600) as r:
        print(r.status, r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except OSError as e:
    print(0, e)
EOF
}

# Free to listen on (SO_REUSEADDR, as the node binds: a just-stopped node's TIME_WAIT does not count).
port_free() {
  "$py" -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()' "$host" "$1" 2>/dev/null
}

# The cluster's shared secret: given to the nodes through the environment, never on a command line.
SHOAL_CLUSTER_KEY=$("$py" -c 'import secrets; print(secrets.token_urlsafe(32))')
export SHOAL_CLUSTER_KEY

wait_up() {  # $1 = url, $2 = log file, $3 = pid
  for _ in $(seq 1 300); do
    get "$1/v1/cluster" >/dev/null 2>&1 && return 0
    if ! kill -0 "$3" 2>/dev/null; then
      echo "demo: the node exited; its log:" >&2; tail -n 30 "$2" >&2; exit 1
    fi
    sleep 0.1
  done
  echo "demo: no answer from $1 after 30 s; log:" >&2; tail -n 30 "$2" >&2; exit 1
}

port=$first_port
urls=()
for i in $(seq 1 "$nodes"); do
  name="node-${letters[$((i - 1))]}"
  while ! port_free "$port"; do port=$((port + 1)); done
  home="$work/$name"
  mkdir -p "$home"
  # Same machine: the first node's device profile is every node's (saves each a few seconds of measuring).
  [ "$i" -gt 1 ] && [ -f "$work/node-a/profile.json" ] && cp "$work/node-a/profile.json" "$home/"
  args=(node --host "$host" --port "$port" --home "$home" --name "$name" --no-discovery --log-level WARNING)
  [ "$i" -gt 1 ] && args+=(--peer "$host:$first_node_port")
  # Own process group (set -m): Ctrl-C reaches only this script, which then stops the nodes in order.
  set -m
  "$shoal" "${args[@]}" >"$work/$name.log" 2>&1 &
  pids+=($!)
  set +m
  echo "demo: $name on http://$host:$port (pid $!, log $work/$name.log)" >&2
  wait_up "http://$host:$port" "$work/$name.log" "$!"
  [ "$i" = 1 ] && first_node_port=$port
  urls+=("http://$host:$port")
  port=$((port + 1))
done

url="${urls[0]}"
for _ in $(seq 1 100); do  # every node sees every other one
  up=$(get "$url/v1/cluster" 2>/dev/null | "$py" -c 'import json, sys; print(sum(n["status"] == "up" for n in json.load(sys.stdin)["nodes"]))' || echo 0)
  [ "$up" -ge "$nodes" ] && break
  sleep 0.1
done

if ! get "$url/" 2>/dev/null | grep -q "<title>shoal</title>"; then
  echo "demo: warning: this build serves no dashboard at $url/ (the node mounts it in src/shoal/assembly.py)" >&2
fi

cat <<EOF

  shoal dashboard:  $url/

  OpenAI API:       $url/v1   (e.g. curl $url/v1/models)
  status:           $shoal status --cluster $url

  Ctrl-C stops the cluster.

EOF

if [ "$model" != "none" ]; then
  echo "demo: placing $model on the cluster…" >&2
  reply=$(post "$url/v1/instances" "{\"model\": \"$model\"}")
  case "${reply%% *}" in
    2??) echo "demo: $model is being served (chat with it in the dashboard)" >&2 ;;
    *) echo "demo: placing $model failed: ${reply:0:300}" >&2 ;;
  esac
fi

# Run until Ctrl-C. A node that dies (try `kill -9` on one) leaves the others running: its log tail
# is shown, and what the cluster did about it (the model re-placed on the nodes left, its streams
# resumed there) a few seconds later.
gone=()
while :; do
  for idx in "${!pids[@]}"; do
    [[ " ${gone[*]-} " == *" $idx "* ]] && continue
    if ! kill -0 "${pids[$idx]}" 2>/dev/null; then
      gone+=("$idx")
      echo "demo: node-${letters[$idx]} (pid ${pids[$idx]}) exited; the last lines of its log:" >&2
      tail -n 5 "$work/node-${letters[$idx]}.log" >&2 || true
      if [ ${#gone[@]} -ge ${#pids[@]} ]; then echo "demo: every node is gone" >&2; exit 1; fi
      alive=$(for j in "${!pids[@]}"; do [[ " ${gone[*]} " == *" $j "* ]] || { echo "${urls[$j]}"; break; }; done)
      ( sleep 8; echo "demo: the cluster now (from $alive):" >&2; "$shoal" instances --cluster "$alive" >&2 || true ) &
    fi
  done
  sleep 1
done
