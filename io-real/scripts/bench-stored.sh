#!/usr/bin/env bash
# Stored sessions at scale on one node (issue 5, item 7):
#
#   io-real/scripts/bench-stored.sh N DIR
#
# builds the release binary, writes DIR/truba.toml (kind 1: handler on 127.0.0.1:7500, 256
# handler slots, no jitter, records up to 2 KiB; up to 2,000,000 sessions), starts
# `truba serve` on a fresh DIR/data, stores N sessions of one 1 KiB record, all due at the same
# second (`truba bench-stored --phase store`), records the server's peak RSS (VmHWM) and the data
# directory's size, stops the server with SIGTERM, restarts it and times it to serving (polling
# `truba status`), records its RSS, then lets everything come due to the echo handler
# `truba bench-stored --phase drain` serves, and prints one summary table.
#
# Environment: TRUBA_BIN (default target/release/truba, built), PORT (default 7640), HANDLER
# (default 127.0.0.1:7500), DUE_IN_S (seconds from the start of storing to the common due time;
# default 60 + N/2500: it must cover storing, the stop and the restart), CONCURRENCY (256),
# RECORD_BYTES (1024).
set -euo pipefail

n=${1:?usage: bench-stored.sh N DIR}
dir=${2:?usage: bench-stored.sh N DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
port=${PORT:-7640}
addr=127.0.0.1:$port
handler=${HANDLER:-127.0.0.1:7500}
due_in_s=${DUE_IN_S:-$((60 + n / 2500))}
concurrency=${CONCURRENCY:-256}
record_bytes=${RECORD_BYTES:-1024}

if [[ -z ${TRUBA_BIN:-} ]]; then
  (cd "$here" && cargo build --release -p truba >&2)
  bin=$here/target/release/truba
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
sessions_max = 2000000

[kinds.1]
handler = "$handler"
handler_slots = 256
jitter_window_s = 0
record_bytes_max = 2048
max_attempts = 0
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

now() { date +%s.%N; }
kib() { awk -v k="$1" '/^'"$1"':/ {print $2}' "/proc/$pid/status"; }
mib() { awk -v k="$1" 'BEGIN {printf "%.0f", k / 1024}'; }

start_server() {
  "$bin" serve --config "$dir/truba.toml" >>"$dir/serve.log" 2>&1 &
  pid=$!
}

# Polls `truba status` until the server answers as serving; prints the seconds it took from $1.
wait_serving() {
  local t0=$1 s
  for _ in $(seq 1 100000); do
    kill -0 "$pid" 2>/dev/null || { echo "bench-stored: the server exited; see $dir/serve.log" >&2; exit 1; }
    if s=$("$bin" status --addr "$addr" --json 2>/dev/null) && [[ $s == *'"serving":true'* ]]; then
      awk -v a="$t0" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}'
      return
    fi
    sleep 0.01
  done
  echo "bench-stored: the server never served" >&2
  exit 1
}

echo "bench-stored: N=$n, DIR=$dir, server $addr, handler $handler, due ${due_in_s} s after storing starts" >&2
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
start_server
wait_serving "$(now)" >/dev/null

# 1. Store.
store_json=$("$bin" bench-stored --addr "$addr" --phase store --sessions "$n" --record-bytes "$record_bytes" \
  --concurrency "$concurrency" --due-in-s "$due_in_s" --json)
echo "$store_json" >&2
store_s=$(sed -E 's/.*"seconds":([0-9.]+).*/\1/' <<<"$store_json")
store_rate=$(sed -E 's/.*"sessions_per_s":([0-9.]+).*/\1/' <<<"$store_json")
due=$(sed -E 's/.*"due_unix_s":([0-9]+).*/\1/' <<<"$store_json")
store_hwm=$(kib VmHWM)
store_rss=$(kib VmRSS)
data_size=$(du -sh "$dir/data" | cut -f1)
load_store=$(cut -d' ' -f1-3 /proc/loadavg)
"$bin" status --addr "$addr" >&2

# 2. Stop (SIGTERM) and restart.
t=$(now)
kill -TERM "$pid"
wait "$pid" || true
pid=
stop_s=$(awk -v a="$t" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')
data_size_stopped=$(du -sh "$dir/data" | cut -f1)
t=$(now)
start_server
restart_s=$(wait_serving "$t")
restart_rss=$(kib VmRSS)
restart_hwm=$(kib VmHWM)
"$bin" status --addr "$addr" >&2

# 3. Drain: everything comes due at once to the echo handler.
left=$((due - $(date +%s)))
if ((left < 0)); then
  echo "bench-stored: restarted ${left#-} s after the due time: deliveries began before the handler was up (raise DUE_IN_S)" >&2
fi
drain_json=$("$bin" bench-stored --addr "$addr" --phase drain --due-at "$due" --handler-addr "$handler" --json)
echo "$drain_json" >&2
drain_rate=$(sed -E 's/.*"deliveries_per_s":([0-9.]+).*/\1/' <<<"$drain_json")
drain_s=$(sed -E 's/.*"seconds":([0-9.]+).*/\1/' <<<"$drain_json")
drain_hwm=$(kib VmHWM)
drain_rss=$(kib VmRSS)
load_drain=$(cut -d' ' -f1-3 /proc/loadavg)
"$bin" status --addr "$addr" >&2
stop_server

printf '\n%-44s %s\n' "stored sessions (1 record of $record_bytes B)" "$n"
printf '%-44s %s s, %.0f sessions/s\n' "time to store" "$store_s" "$store_rate"
printf '%-44s %s MiB (RSS at the end %s MiB)\n' "peak RSS while storing (VmHWM)" "$(mib "$store_hwm")" "$(mib "$store_rss")"
printf '%-44s %s (after the stop: %s)\n' "data directory" "$data_size" "$data_size_stopped"
printf '%-44s %s s\n' "stop (SIGTERM to exit)" "$stop_s"
printf '%-44s %s s\n' "restart to serving" "$restart_s"
printf '%-44s %s MiB (VmHWM %s MiB)\n' "RSS after restart" "$(mib "$restart_rss")" "$(mib "$restart_hwm")"
printf '%-44s %s s, %.0f deliveries/s\n' "drain (echo handler deletes each)" "$drain_s" "$drain_rate"
printf '%-44s %s MiB (RSS at the end %s MiB)\n' "peak RSS since restart (VmHWM)" "$(mib "$drain_hwm")" "$(mib "$drain_rss")"
printf '%-44s %s / %s / %s\n' "load average before / after store / drain" "$load_before" "$load_store" "$load_drain"
