#!/usr/bin/env bash
# The reading side on three nodes on loopback (tails and consumers), one sitting:
#
#   io-real/scripts/bench-read.sh [DIR]
#
# builds the release binary (copied to DIR/bin, so a rebuild meanwhile changes nothing), starts a
# fresh three-node cluster with local-cluster.sh in DIR/cluster (ledger retention ENGINE_TOML,
# by default 8 GiB so the fill stays whole) and runs, one after the other:
#   1. fill + catch-up from the leader: FILL appends of 256 B (64 sessions over one connection,
#      the load of `truba bench`), then a tail on the leader from the oldest entry to the head;
#   2. catch-up from a follower: the same tail on a follower;
#   3. live: the append load for LIVE_S seconds with no tail (the baseline), then with TAILERS
#      tails reading from the head on the two followers, alternating, ROUNDS times;
#   4. a consumer committing OPS_PER_COMMIT new stored sessions a commit, for CONSUMER_S seconds;
# then stops the cluster and prints one summary table (medians over the rounds for the live
# runs). Every result is a JSON line in DIR/results.jsonl; node logs stay in DIR/cluster.
#
# Environment: TRUBA_BIN (default: the release binary in CARGO_TARGET_DIR or target/, built),
# FILL (1000000), LIVE_S (10), TAILERS (10), ROUNDS (1), CONSUMER_S (10), OPS_PER_COMMIT (16),
# ENGINE_TOML (lines for every node's [engine] section; default ledger_retain_bytes_max = 8 GiB).
set -euo pipefail

dir=$(realpath -m "${1:-/tmp/truba-bench-read}")
here=$(cd "$(dirname "$0")/../.." && pwd)
fill=${FILL:-1000000}
live_s=${LIVE_S:-10}
tailers=${TAILERS:-10}
rounds=${ROUNDS:-1}
consumer_s=${CONSUMER_S:-10}
ops_per_commit=${OPS_PER_COMMIT:-16}
export ENGINE_TOML=${ENGINE_TOML:-ledger_retain_bytes_max = 8589934592}
addrs=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
load=(--clients 64 --connections 1 --record-bytes 256)

if [[ -z ${TRUBA_BIN:-} ]]; then
  (cd "$here" && cargo build --release -p truba >&2)
  src=${CARGO_TARGET_DIR:-$here/target}/release/truba
else
  src=$TRUBA_BIN
fi
rm -rf "$dir" && mkdir -p "$dir/bin"
cp "$src" "$dir/bin/truba"
bin=$dir/bin/truba
export TRUBA_BIN=$bin
out=$dir/results.jsonl
cluster=$dir/cluster

for a in ${addrs//,/ }; do
  if "$bin" status --addr "$a" >/dev/null 2>&1; then
    echo "bench-read: something already answers on $a: stop it first (local-cluster.sh stop DIR)" >&2
    exit 1
  fi
done

stop_cluster() { "$here/io-real/scripts/local-cluster.sh" stop "$cluster" >/dev/null 2>&1 || true; }
trap stop_cluster EXIT
trap 'exit 130' INT TERM

"$here/io-real/scripts/local-cluster.sh" start "$cluster" >&2

# The leader's and the followers' client addresses.
leader= followers=()
for a in ${addrs//,/ }; do
  if "$bin" status --addr "$a" --json | grep -q '"role":"leader"'; then leader=$a; else followers+=("$a"); fi
done
[[ -n $leader ]] || { echo "bench-read: no leader" >&2; exit 1; }
follower_list=$(IFS=,; echo "${followers[*]}")
echo "bench-read: leader $leader, followers $follower_list" >&2
# The servers' pids, leader first (node N listens on 740N), for their CPU time in the live runs.
pids=
for a in "$leader" "${followers[@]}"; do pids+="${pids:+,}$(cat "$cluster/node${a: -1}.pid")"; done

run() { # TAG ARGS...: one bench-read run, its JSON line tagged into results.jsonl
  local tag=$1 r
  shift
  echo "bench-read: $tag (load average $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  r=$("$bin" bench-read "$@" --json)
  echo "{\"tag\":\"$tag\",\"load_avg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\",\"r\":$r}" | tee -a "$out" >&2
}

run catchup-leader --mode tail-catchup --addr "$leader" --fill "$fill" --fill-addr "$addrs" "${load[@]}"
run catchup-follower --mode tail-catchup --addr "${followers[0]}"
for round in $(seq 1 "$rounds"); do
  run live-0 --mode tail-live --addr "$addrs" --duration-s "$live_s" --tailers 0 --server-pids "$pids" "${load[@]}"
  run "live-$tailers" --mode tail-live --addr "$addrs" --duration-s "$live_s" --tailers "$tailers" \
    --tail-addrs "$follower_list" --server-pids "$pids" "${load[@]}"
done
run consumer --mode consumer --addr "$addrs" --duration-s "$consumer_s" --ops-per-commit "$ops_per_commit"
"$bin" status --addr "$addrs" >&2
stop_cluster
if grep -qE ' (WARN|ERROR) ' "$cluster"/node*.log; then
  echo "bench-read: the node logs hold warnings or errors:" >&2
  grep -hE ' (WARN|ERROR) ' "$cluster"/node*.log | head -20 >&2
fi

python3 - "$out" "$tailers" <<'PY'
import json, statistics as st, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs[j["tag"]].append(j["r"])
tailers = sys.argv[2]
med = lambda rs, f: st.median(f(r) for r in rs)
rows = []
if "catchup-leader" in runs:
    f = runs["catchup-leader"][0]["fill"]
    rows.append(("fill (64 sessions, 1 connection, 256 B)",
                 f"{f['appends']} appends, {f['appends_per_s']:.0f}/s, p99 {f['latency']['p99_ms']:.2f} ms"))
for tag, name in (("catchup-leader", "catch-up from the leader"), ("catchup-follower", "catch-up from a follower")):
    for r in runs.get(tag, []):
        rows.append((name, f"{r['events_per_s']:.0f} events/s, {r['mib_per_s']:.1f} MiB/s "
                           f"({r['events']} events, {r['bytes'] / 2**20:.0f} MiB, {r['seconds']:.2f} s)"))
base = runs.get("live-0", [])
live = runs.get(f"live-{tailers}", [])
def load_row(rs):
    return (f"{med(rs, lambda r: r['appends_per_s']):.0f} appends/s, p50 {med(rs, lambda r: r['latency']['p50_ms']):.2f} ms, "
            f"p99 {med(rs, lambda r: r['latency']['p99_ms']):.2f} ms (median of {len(rs)})")
def cpu_row(rs):
    # CPU seconds per second of load (cores busy), medians: servers leader first, then the bench's threads.
    cores = lambda f: med(rs, lambda r: (f(r) or 0) / r['seconds'])
    servers = [cores(lambda r, i=i: r['cpu']['servers'][i]['cpu_s']) for i in range(len(rs[0]['cpu']['servers']))]
    names = ["leader"] + [f"follower {i}" for i in range(1, len(servers))]
    text = ", ".join(f"{n} {c:.2f}" for n, c in zip(names, servers))
    text += f"; load generator {cores(lambda r: r['cpu']['load_thread_s']):.2f}"
    if rs[0]['cpu']['tails_thread_s'] is not None:
        text += f", tails {cores(lambda r: r['cpu']['tails_thread_s']):.2f}"
    return text
if base:
    rows.append(("live, no tails: appends", load_row(base)))
    rows.append(("  CPU, cores busy", cpu_row(base)))
if live:
    rows.append((f"live, {tailers} tails on followers: appends", load_row(live)))
    rows.append(("  CPU, cores busy", cpu_row(live)))
    if base:
        ratio = med(live, lambda r: r['appends_per_s']) / med(base, lambda r: r['appends_per_s'])
        rows.append((f"  appends/s with {tailers} tails / without", f"{ratio:.2f}"))
    rows.append((f"  events/s per tail", f"{med(live, lambda r: r['events_per_s_per_tail']):.0f}"))
    lag = lambda k: med(live, lambda r: r['lag_all'][k])
    rows.append(("  lag, every tail (upper bound, see below)",
                 f"p50 {lag('p50_ms'):.2f} ms, p99 {lag('p99_ms'):.2f} ms, p999 {lag('p999_ms'):.2f} ms, max {lag('max_ms'):.2f} ms"))
    if all(r.get('behind_ack') for r in live):
        ba = lambda k: med(live, lambda r: r['behind_ack']['behind'][k])
        ahead = med(live, lambda r: r['behind_ack']['ahead_fraction']) * 100
        rows.append(("  behind the writer's ack (see below)",
                     f"p50 {ba('p50_ms'):.2f} ms, p99 {ba('p99_ms'):.2f} ms, p999 {ba('p999_ms'):.2f} ms; {ahead:.0f}% came first"))
for r in runs.get("consumer", []):
    rows.append((f"consumer, {r['ops_per_commit']} ops a commit",
                 f"{r['commits_per_s']:.0f} commits/s, {r['ops_per_s']:.0f} ops/s, "
                 f"p50 {r['latency']['p50_ms']:.2f} ms, p99 {r['latency']['p99_ms']:.2f} ms"))
print()
for k, v in rows:
    print(f"{k:<46} {v}")
if live:
    print("\n" + live[0]["lag_note"])
PY
