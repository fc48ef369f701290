#!/usr/bin/env bash
# Times a node's restart on a copy of a data directory: from the process's
# start to /readyz answering 200, and the CPU it used until then. For the
# restart benchmark of docs/benchmarks.md ("Importing a million device
# identities"): make the directory once with TestImportBenchmark and
# APPLIANCE_IMPORT_BENCH_DIR, then time binaries on it, alternated.
#
# usage: scripts/bench-restart.sh BINARY DATA_DIR
set -euo pipefail
bin=${1:?usage: $0 BINARY DATA_DIR}
src=${2:?usage: $0 BINARY DATA_DIR}
[ -x "$bin" ] || { echo "$0: $bin is not an executable" >&2; exit 2; }
[ -d "$src/raft" ] || { echo "$0: $src holds no node data (no raft/ in it)" >&2; exit 2; }
run=$(mktemp -d "${TMPDIR:-/tmp}/bench-restart.XXXXXX")
pid=
cleanup() { [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; rm -rf "$run"; }
trap cleanup EXIT
cp -a "$src/." "$run/"
rm -f "$run/http-url"
sync
start=$(date +%s.%N)
APPLIANCE_EVENTS_ADDR=127.0.0.1:0 "$bin" serve --data-dir "$run" --node-id n1 --http-addr 127.0.0.1:0 \
  --raft-addr 127.0.0.1:0 --mqtt-addr 127.0.0.1:0 >"$run.log" 2>&1 &
pid=$!
while :; do
  if [ -f "$run/http-url" ] && [ "$(curl -sk -o /dev/null -w '%{http_code}' "$(cat "$run/http-url")/readyz")" = 200 ]; then
    break
  fi
  kill -0 "$pid" 2>/dev/null || { echo "$0: the node exited before it was ready; its log:" >&2; tail -20 "$run.log" >&2; exit 1; }
  sleep 0.05
done
end=$(date +%s.%N)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$pid/stat")
tck=$(getconf CLK_TCK)
printf 'ready %.2f s  cpu %.2f s user + %.2f s system  load %s\n' "$(echo "$end - $start" | bc)" \
  "$(echo "$utime / $tck" | bc -l)" "$(echo "$stime / $tck" | bc -l)" "$(cut -d' ' -f1-3 /proc/loadavg)"
kill -TERM "$pid"
wait "$pid" || true
pid=
rm -f "$run.log"
