#!/usr/bin/env bash
# A watcher's resync over many stored sessions, most of them spilled to source files, on one node:
#
#   io-real/scripts/bench-watch-resync.sh N DIR
#
# builds the release binary, writes DIR/truba.toml (a small memtable, MEMTABLE_BYTES, so that
# nearly every stored session is in a source file; up to max(2,000,000, 2N) sessions; kind 1 with
# records up to 2 KiB and a handler address nobody serves), starts `truba serve` on a fresh
# DIR/data, stores N sessions of one RECORD_BYTES record due in a day (`truba bench-stored --phase
# store`: none comes due during the run), waits until the spills are done (the spilled count and
# the source files unchanged for 2 s), then opens a watch of every kind (`truba bench-read --mode
# watch-resync`, acknowledging each item as it is processed) and times it from the open to
# `Synced` and on to the head, sampling the server's VmRSS every 50 ms. Prints one summary table.
#
# The resync is the newest snapshot's sessions; those stored after that snapshot would come after
# `Synced` as changes (two each: created, stored). So before the watch opens, the script appends
# filler (`truba bench`: 1 KiB appends to short sessions it deletes) until a snapshot newer than
# the store exists, so that every stored session is in the resync; the filler entries after that
# snapshot come as changes, counted apart. SNAPSHOT_FIRST=0 skips the filler.
#
# Environment: TRUBA_BIN (default: the release binary in CARGO_TARGET_DIR or target/, built),
# PORT (7650), SNAPSHOT_FIRST (1), MEMTABLE_BYTES (1048576), RECORD_BYTES (1024), CONCURRENCY (256), WINDOW (the
# watcher's window; default the server's, engine.watch_window_events_max = 1024).
set -euo pipefail

n=${1:?usage: bench-watch-resync.sh N DIR}
dir=${2:?usage: bench-watch-resync.sh N DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
port=${PORT:-7650}
addr=127.0.0.1:$port
memtable=${MEMTABLE_BYTES:-1048576}
record_bytes=${RECORD_BYTES:-1024}
concurrency=${CONCURRENCY:-256}
sessions_max=$((n * 2 > 2000000 ? n * 2 : 2000000))

if [[ -z ${TRUBA_BIN:-} ]]; then
  (cd "$here" && cargo build --release -p truba >&2)
  bin=${CARGO_TARGET_DIR:-$here/target}/release/truba
else
  bin=$TRUBA_BIN
fi

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
rm -rf "$dir/data"
cat >"$dir/truba.toml" <<TOML
data_dir = "$dir/data"
listen = "$addr"

[engine]
sessions_max = $sessions_max
stored_memtable_bytes_max = $memtable

[kinds.1]
handler = "127.0.0.1:7599"
record_bytes_max = 2048
TOML

pid=
stop_server() {
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
  fi
  pid=
}
trap stop_server EXIT
trap 'exit 130' INT TERM

kib() { awk '/^'"$1"':/ {print $2}' "/proc/$pid/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k / 1024}'; }
field() { sed -E 's/.*"'"$1"'":([0-9.]+).*/\1/' <<<"$2"; }

if "$bin" status --addr "$addr" >/dev/null 2>&1; then
  echo "bench-watch-resync: something already answers on $addr (PORT=...)" >&2
  exit 1
fi
echo "bench-watch-resync: N=$n, DIR=$dir, server $addr, memtable $memtable B, records $record_bytes B" >&2
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
"$bin" serve --config "$dir/truba.toml" >>"$dir/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 1000); do
  kill -0 "$pid" 2>/dev/null || { echo "bench-watch-resync: the server exited; see $dir/serve.log" >&2; exit 1; }
  s=$("$bin" status --addr "$addr" --json 2>/dev/null) && [[ $s == *'"serving":true'* ]] && break
  sleep 0.02
done

# 1. Store N sessions, due in a day.
store_json=$("$bin" bench-stored --addr "$addr" --phase store --sessions "$n" --record-bytes "$record_bytes" \
  --concurrency "$concurrency" --due-in-s 86400 --json)
echo "$store_json" >&2

# 2. Wait until the spills (and the merges they bring) are done.
t0=$(date +%s.%N)
last= same=0
for _ in $(seq 1 6000); do
  s=$("$bin" status --addr "$addr" --json)
  now="$(field sessions_spilled "$s") $(field source_files "$s")"
  if [[ $now == "$last" ]]; then same=$((same + 1)); else same=0; last=$now; fi
  ((same >= 20)) && break
  sleep 0.1
done
spill_wait=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a - 2}')
status_json=$("$bin" status --addr "$addr" --json)
applied=$(field applied "$status_json")

# 3. Filler until a snapshot covers the store.
newest_snapshot() { find "$dir/data" -maxdepth 1 -name 'snap-*.snap' -printf '%f\n' | sed -E 's/^snap-0*([0-9]+)\.snap$/\1/' | sort -n | tail -1; }
filler=0
if [[ ${SNAPSHOT_FIRST:-1} == 1 ]]; then
  for _ in $(seq 1 40); do
    snap=$(newest_snapshot)
    ((${snap:-0} >= applied)) && break
    "$bin" bench --addr "$addr" --clients 64 --connections 1 --record-bytes 1024 --appends-per-session 16 \
      --ops 8192 --probe-s 0 --json >/dev/null
    filler=$((filler + 8192))
    sleep 0.5
  done
  snap=$(newest_snapshot)
  ((${snap:-0} >= applied)) || echo "bench-watch-resync: no snapshot covers the store after $filler filler appends" >&2
fi
status_json=$("$bin" status --addr "$addr" --json)
stored=$(field sessions_stored "$status_json")
spilled=$(field sessions_spilled "$status_json")
sources=$(field source_files "$status_json")
data_size=$(du -sh "$dir/data" | cut -f1)
"$bin" status --addr "$addr" >&2
hwm_before=$(kib VmHWM)

# 4. The resync.
load_resync=$(cut -d' ' -f1-3 /proc/loadavg)
window=()
[[ -n ${WINDOW:-} ]] && window=(--window "$WINDOW")
r=$("$bin" bench-read --mode watch-resync --addr "$addr" --server-pid "$pid" "${window[@]}" --json)
echo "$r" >&2
hwm_after=$(kib VmHWM)
stop_server

python3 - "$r" "$n" "$stored" "$spilled" "$sources" "$data_size" "$spill_wait" "$hwm_before" "$hwm_after" \
  "$load_before" "$load_resync" "$record_bytes" "$filler" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
n, stored, spilled, sources, size, spill_wait, hwm0, hwm1, load0, load1, rb, filler = sys.argv[2:]
rss = r["server_rss"]
mib = lambda k: f"{int(k) / 1024:.0f} MiB"
rows = [
    (f"stored sessions (1 record of {rb} B)", f"{n} ({spilled} spilled to {sources} source files; {stored} stored)"),
    ("data directory", size),
    ("spills settled after the store", f"{spill_wait} s"),
    ("filler appends (1 KiB) before the watch", f"{filler} (for a snapshot newer than the store)"),
    ("resync: snapshot index / head at the open", f"{r['resync_at']} / {r['head']}"),
    ("resync: sessions to Synced", f"{r['sessions']} in {r['synced_s']:.2f} s: {r['sessions_per_s']:.0f} sessions/s, {r['mib_per_s']:.1f} MiB/s of records"),
    ("first item after the open", f"{r['first_item_s']:.3f} s"),
    ("then changes to the head", f"{r['changes_to_head']} ({r['to_head_s']:.2f} s from the open in all)"),
    ("resyncs started over", f"{r['resyncs'] - 1}"),
    ("server VmRSS before / peak / end", f"{mib(rss['before_kib'])} / {mib(rss['peak_kib'])} / {mib(rss['end_kib'])}"),
    ("server VmRSS growth during the resync", f"{mib(rss['growth_kib'])} (peak {rss['peak_at_s']:.1f} s in, {rss['samples']} samples every {rss['every_ms']} ms)"),
    ("server VmHWM before / after the resync", f"{mib(hwm0)} / {mib(hwm1)}"),
    ("load average before / at the resync", f"{load0} / {load1}"),
]
print()
for k, v in rows:
    print(f"{k:<44} {v}")
PY
