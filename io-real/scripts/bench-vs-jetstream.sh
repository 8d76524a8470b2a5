#!/usr/bin/env bash
# truba (3 nodes) beside NATS JetStream R3 (3 nodes), on loopback, the same load, alternating.
#
#   io-real/scripts/bench-vs-jetstream.sh [ROUNDS] [DIR]
#
# Each round runs, each on a fresh cluster that is stopped before the next starts:
#   truba 1 session, JetStream 1 publisher, truba 64 sessions, JetStream 64 publishers
# (256-byte records, 10 s each; truba's 64 sessions and JetStream's 64 publishers each share one
# connection, the best setting of either here; see BENCHMARKS.md). One JSON line per run goes to
# DIR/results.jsonl, and medians are printed at the end. ROUNDS defaults to 5, DIR to
# /tmp/truba-vs-jetstream (removed first). Needs nats-server (apt-get install -y nats-server) and
# ../shared/peers/nats-cluster.sh beside the work tree (NATS_CLUSTER overrides the script).
set -euo pipefail

rounds=${1:-5}
dir=$(realpath -m "${2:-/tmp/truba-vs-jetstream}")
here=$(cd "$(dirname "$0")/../.." && pwd)
nats_cluster=${NATS_CLUSTER:-$here/../shared/peers/nats-cluster.sh}
secs=${BENCH_SECONDS:-10}
truba_addrs=127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403
nats_urls=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224

[ -x "$nats_cluster" ] || { echo "no $nats_cluster" >&2; exit 1; }
command -v nats-server >/dev/null || { echo "nats-server missing: apt-get install -y nats-server" >&2; exit 1; }
(cd "$here" && cargo build --release -q -p truba \
  && cargo build --release -q -p truba --features jetstream-bench --bin jetstream-bench)
# Copies, so that a rebuild by someone else in the same tree does not change the code mid-run.
rm -rf "$dir" && mkdir -p "$dir/bin" "$dir/logs"
cp "$here/target/release/truba" "$here/target/release/jetstream-bench" "$dir/bin/"
export TRUBA_BIN=$dir/bin/truba
out=$dir/results.jsonl

gone() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) || return 0; [[ $s == Z* ]]; }

truba_run() { # CLIENTS CONNECTIONS TAG
  local d=$dir/truba
  rm -rf "$d"
  "$here/io-real/scripts/local-cluster.sh" start "$d" >/dev/null
  local r
  r=$("$TRUBA_BIN" bench --addr $truba_addrs --clients "$1" --connections "$2" --record-bytes 256 \
    --duration-s "$secs" --probe-dir "$d" --probe-s 2 --json)
  "$here/io-real/scripts/local-cluster.sh" stop "$d" >/dev/null
  mkdir -p "$dir/logs/$3" && cp "$d"/node*.log "$dir/logs/$3/"
  echo "{\"system\":\"truba\",\"tag\":\"$3\",\"r\":$r}" | tee -a "$out"
}

js_run() { # CLIENTS CONNECTIONS TAG
  local d=$dir/nats
  rm -rf "$d"
  "$nats_cluster" start "$d"
  local r pids
  r=$("$dir/bin/jetstream-bench" --url $nats_urls --clients "$1" --connections "$2" --record-bytes 256 \
    --duration-s "$secs" --json)
  pids=$(cat "$d"/n*.pid)
  "$nats_cluster" stop "$d"
  for p in $pids; do while ! gone "$p"; do sleep 0.05; done; done
  mkdir -p "$dir/logs/$3" && cp "$d"/n*.log "$dir/logs/$3/"
  echo "{\"system\":\"jetstream\",\"tag\":\"$3\",\"r\":$r}" | tee -a "$out"
}

nats-server --version
for round in $(seq 1 "$rounds"); do
  echo "round $round, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  truba_run 1 1 truba-1-$round
  js_run 1 1 jetstream-1-$round
  truba_run 64 1 truba-64-$round
  js_run 64 1 jetstream-64-$round
done

python3 - "$out" <<'PY'
import json, statistics as st, sys, collections
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs[(j["system"], j["r"]["clients"])].append(j["r"])
print(f"{'system':10} {'sessions':>8} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p999 ms':>8} {'runs':>5}  raw write+fsync/s")
for (system, clients), rs in sorted(runs.items()):
    m = lambda k: st.median(r[k] for r in rs)
    raw = [r["raw_fsync_per_s"] for r in rs if r.get("raw_fsync_per_s")]
    raw = f"{st.median(raw):.0f}" if raw else "-"
    print(f"{system:10} {clients:>8} {m('ops_per_s'):>8.0f} {m('p50_ms'):>7.2f} {m('p99_ms'):>7.2f} {m('p999_ms'):>8.2f} "
          f"{len(rs):>5}  {raw}")
PY
