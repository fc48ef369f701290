#!/usr/bin/env bash
# `make cluster`: three controller nodes on 127.0.0.1 and a simulated device
# set, to watch a cluster work and fail over. Ctrl-C stops everything.
#
#   node   API                      raft (cluster port)   MQTT
#   n1     https://127.0.0.1:7480   127.0.0.1:7481        127.0.0.1:1883
#   n2     https://127.0.0.1:7490   127.0.0.1:7491        127.0.0.1:1893
#   n3     https://127.0.0.1:7500   127.0.0.1:7501        127.0.0.1:1903
#
# Data lives in $CLUSTER_DIR (default ./.cluster): run it again and the
# cluster resumes. Remove the directory for a fresh one. CLUSTER_PORTS
# replaces the nine ports above (API, raft, MQTT of n1, then n2, then n3);
# DEVICES sets how many devices are simulated (50).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-./bin/appliance}
DIR=${CLUSTER_DIR:-.cluster}
DEVICES=${DEVICES:-50}
read -r -a P <<<"${CLUSTER_PORTS:-7480 7481 1883 7490 7491 1893 7500 7501 1903}"
if [ ${#P[@]} -ne 9 ]; then
  echo "CLUSTER_PORTS: want nine ports (API, raft, MQTT of n1, n2, n3); got '${CLUSTER_PORTS}'" >&2
  exit 2
fi
mkdir -p "$DIR"

pids=()
cleanup() { # how: int (Ctrl-C) or term
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  if [ "$1" = int ]; then
    # Ctrl-C in a terminal signals the whole foreground group, the nodes
    # included, and they are shutting down gracefully already; a second
    # signal would make them exit at once. Give them time, then signal
    # whatever still runs.
    for _ in $(seq 1 100); do
      alive=0
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.1
    done
  fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'cleanup int' INT
trap 'cleanup term' TERM EXIT

start_node() { # id http raft mqtt [join args...]
  local id=$1 http=$2 raft=$3 mqtt=$4; shift 4
  "$BIN" serve --data-dir "$DIR/$id" --node-id "$id" --http-addr "127.0.0.1:$http" \
    --raft-addr "127.0.0.1:$raft" --mqtt-addr "127.0.0.1:$mqtt" --events-addr 127.0.0.1:0 "$@" >"$DIR/$id.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    [ -s "$DIR/$id/http-url" ] && return 0
    kill -0 "${pids[-1]}" 2>/dev/null || { echo "node $id failed to start:"; tail -5 "$DIR/$id.log"; exit 1; }
    sleep 0.1
  done
  echo "node $id did not start in 30 s; see $DIR/$id.log"; exit 1
}

start_node n1 "${P[0]}" "${P[1]}" "${P[2]}"
# Secrets go in files, never on a command line (ps shows those to everyone).
start_node n2 "${P[3]}" "${P[4]}" "${P[5]}" --join "https://127.0.0.1:${P[1]}" --join-token-file "$DIR/n1/join-token"
start_node n3 "${P[6]}" "${P[7]}" "${P[8]}" --join "https://127.0.0.1:${P[1]}" --join-token-file "$DIR/n1/join-token"

export APPLIANCE_DATA_DIR="$DIR/n1"
"$BIN" cluster members

# A device group and a deployment for it; the simulated devices enroll
# through any node and are spread over all three brokers.
enroll=$("$BIN" enrollment show demo -o json >/dev/null 2>&1 && echo "" || "$BIN" enrollment create demo --tag site=demo -o json | sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
if [ -n "$enroll" ]; then (umask 077; echo "$enroll" >"$DIR/enroll-token"); fi
"$BIN" deployment show demo-v1 >/dev/null 2>&1 || "$BIN" deployment create demo-v1 \
  --content examples/edge-deployment.json --target-condition "tags.site='demo'" --priority 1 >/dev/null
"$BIN" sim --server "mqtts://127.0.0.1:${P[2]},mqtts://127.0.0.1:${P[5]},mqtts://127.0.0.1:${P[8]}" \
  --ca-file "$DIR/n1/tls/ca.crt" --devices "$DEVICES" --enroll-token-file "$DIR/enroll-token" --prefix demo >"$DIR/sim.log" 2>&1 &
pids+=($!)

cat <<EOT

Three nodes and $DEVICES simulated devices are running (logs in $DIR/).
In another terminal:
  export APPLIANCE_DATA_DIR=$DIR/n2          # talk to n2 (any node serves)
  ./bin/appliance cluster members             # who leads
  ./bin/appliance deployment status demo-v1 --watch
Kill the leader's process (see the pids below) and watch another node take
over within a second; the devices move to a live broker and keep reporting.
  pids: n1=${pids[0]} n2=${pids[1]} n3=${pids[2]} sim=${pids[3]}
Ctrl-C stops everything.
EOT
wait
