#!/usr/bin/env bash
# A learner joining a three-node cluster that holds many stored sessions (issue 13):
#
#   io-real/scripts/bench-learner.sh N DIR
#
# starts io-real/scripts/local-cluster.sh in DIR (release binary), stores N sessions of one
# 1 KiB record due in two hours (`truba bench-stored --phase store`), measures the append load
# alone (`truba bench`, 16 clients, BENCH_S seconds), then starts node 4 on an empty directory
# (`local-cluster.sh join 4`), adds it as a learner and runs the same append load while it
# catches up. Caught up: node 4 has applied the leader's commit index as it was when the learner
# was added. Prints the time to catch up, node 4's peak RSS (VmHWM), its data directory's size,
# and the appends per second (with p99) alone and during the catch-up, then stops everything.
#
# Environment: BENCH_S (default 30), TRUBA_BIN (default target/release/truba, built).
set -euo pipefail

n=${1:?usage: bench-learner.sh N DIR}
dir=${2:?usage: bench-learner.sh N DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
bench_s=${BENCH_S:-30}
if [[ -z ${TRUBA_BIN:-} ]]; then
  (cd "$here" && cargo build --release -p truba >&2)
  export TRUBA_BIN=$here/target/release/truba
fi
bin=$TRUBA_BIN
cluster=$here/io-real/scripts/local-cluster.sh
addrs=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
export TRUBA_ADDR=$addrs

rm -rf "$dir"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
trap '"$cluster" stop "$dir" >/dev/null 2>&1 || true' EXIT

ENGINE_TOML='sessions_max = 2000000' "$cluster" start "$dir" >/dev/null
echo "storing $n sessions ..." >&2
start=$(date +%s.%N)
"$bin" bench-stored --addr "$addrs" --phase store --sessions "$n" --due-in-s 7200 >&2
store_s=$(echo "$(date +%s.%N) - $start" | bc)

echo "append load alone ($bench_s s) ..." >&2
alone=$("$bin" bench --addr "$addrs" --clients 16 --duration-s "$bench_s" --probe-s 0 --json)

"$cluster" join 4 "$dir" >/dev/null
pid4=$(cat "$dir/node4.pid")
leader_commit() {
  "$bin" member list --addr "$addrs" --json | python3 -c 'import sys,json; print(json.load(sys.stdin)["commit"] or 0)'
}
target=$(leader_commit)
"$bin" member add 4 --peer 127.0.0.1:7414 --client 127.0.0.1:7404 >&2
added=$(date +%s.%N)
"$bin" bench --addr "$addrs" --clients 16 --duration-s "$bench_s" --probe-s 0 --json >"$dir/during.json" &
bench_pid=$!
caught=
while true; do
  applied=$("$bin" status --addr 127.0.0.1:7404 --json 2>/dev/null |
    python3 -c 'import sys,json; print(json.load(sys.stdin)["applied"])' 2>/dev/null || echo 0)
  if [[ $applied -ge $target && $target -gt 0 ]]; then
    caught=$(echo "$(date +%s.%N) - $added" | bc)
    break
  fi
  if ! kill -0 "$pid4" 2>/dev/null; then
    echo "node 4 exited; see $dir/node4.log" >&2
    exit 1
  fi
  sleep 0.2
done
wait "$bench_pid"
during=$(cat "$dir/during.json")
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$pid4/status")
size=$(du -sm "$dir/node4" | cut -f1)
field() { python3 -c "import sys,json; print(round(json.loads(sys.argv[1])['$2'], 1))" "$1"; }

echo
echo "| | N = $n |"
echo "| --- | ---: |"
echo "| storing (3 nodes) | ${store_s%.*} s |"
echo "| leader's commit index when the learner was added | $target |"
echo "| **learner caught up** (applied that index) | **${caught} s** |"
echo "| learner's peak RSS (VmHWM) | $((hwm / 1024)) MiB |"
echo "| learner's data directory | $size MiB |"
echo "| appends/s alone (p99 ms) | $(field "$alone" ops_per_s) ($(field "$alone" p99_ms)) |"
echo "| appends/s while it catches up, ${bench_s} s (p99 ms) | $(field "$during" ops_per_s) ($(field "$during" p99_ms)) |"
