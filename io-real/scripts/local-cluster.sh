#!/usr/bin/env bash
# A three-node truba cluster on loopback, for trying things out and for benchmarks.
#
#   io-real/scripts/local-cluster.sh start [DIR]   write configs, start three servers, wait for a leader
#   io-real/scripts/local-cluster.sh status [DIR]  every node's role, term, commit, applied and lag
#   io-real/scripts/local-cluster.sh join N [DIR]  start node N (4-9) on an empty directory; it
#                                                  joins through node 1 (then `truba member add`)
#   io-real/scripts/local-cluster.sh kill N [DIR]  SIGKILL node N
#   io-real/scripts/local-cluster.sh restart N [DIR]
#   io-real/scripts/local-cluster.sh stop [DIR]    SIGTERM every node and wait
#
# Clients reach the nodes on 127.0.0.1:7401-7403 (TRUBA_ADDR is printed); members talk on
# 7411-7413. A joined node N takes 740N and 741N. DIR (default ./truba-cluster) holds node1..3.toml, the data directories and logs.
# TRUBA_BIN overrides the binary (default: target/release/truba, built if missing). ENGINE_TOML,
# if set, is written under an [engine] section of every node's config at start (TOML lines, e.g.
# ENGINE_TOML='ledger_retain_bytes_max = 4294967296').
set -euo pipefail

cmd=${1:-}
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${TRUBA_BIN:-$here/target/release/truba}
addrs="127.0.0.1:7401,127.0.0.1:7402,127.0.0.1:7403"

die() { echo "local-cluster: $*" >&2; exit 1; }

write_configs() {
  local dir=$1
  mkdir -p "$dir"
  for i in 1 2 3; do
    cat >"$dir/node$i.toml" <<TOML
data_dir = "$dir/node$i"
listen = "127.0.0.1:740$i"

[cluster]
id = $i
members = [
  { id = 1, peer = "127.0.0.1:7411", client = "127.0.0.1:7401" },
  { id = 2, peer = "127.0.0.1:7412", client = "127.0.0.1:7402" },
  { id = 3, peer = "127.0.0.1:7413", client = "127.0.0.1:7403" },
]

[kinds.1]
handler = "127.0.0.1:7500"
default_delay_s = 60
TOML
    if [ -n "${ENGINE_TOML:-}" ]; then
      printf '\n[engine]\n%s\n' "$ENGINE_TOML" >>"$dir/node$i.toml"
    fi
  done
}

# Running, and not a zombie left by a SIGKILL nobody has reaped yet.
alive() {
  local stat
  stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $stat != Z* ]]
}

write_joiner_config() {
  local dir=$1 i=$2
  cat >"$dir/node$i.toml" <<TOML
data_dir = "$dir/node$i"
listen = "127.0.0.1:740$i"

[cluster]
id = $i
members = [ { id = $i, peer = "127.0.0.1:741$i", client = "127.0.0.1:740$i" } ]

[kinds.1]
handler = "127.0.0.1:7500"
TOML
  # Kept for restarts: a joined node is started with --join every time (asked only when its
  # data directory is empty).
  echo "127.0.0.1:7401" >"$dir/node$i.join"
}

start_node() {
  local dir=$1 i=$2
  if [ -f "$dir/node$i.pid" ] && alive "$(cat "$dir/node$i.pid")"; then
    echo "node $i already runs (pid $(cat "$dir/node$i.pid"))"
    return
  fi
  local join=()
  if [ -f "$dir/node$i.join" ]; then
    join=(--join "$(cat "$dir/node$i.join")")
  fi
  RUST_LOG=${RUST_LOG:-info} "$bin" serve --config "$dir/node$i.toml" "${join[@]}" >>"$dir/node$i.log" 2>&1 &
  echo $! >"$dir/node$i.pid"
  echo "node $i: pid $! (log $dir/node$i.log)"
}

wait_for_leader() {
  for _ in $(seq 1 100); do
    if "$bin" status --addr "$addrs" --json 2>/dev/null | grep -q '"role":"leader"'; then
      return 0
    fi
    sleep 0.1
  done
  die "no leader after 10 s; see the logs"
}

case "$cmd" in
  start)
    dir=$(realpath -m "${2:-./truba-cluster}")
    [ -x "$bin" ] || (cd "$here" && cargo build --release -p truba)
    write_configs "$dir"
    for i in 1 2 3; do start_node "$dir" "$i"; done
    wait_for_leader
    "$bin" status --addr "$addrs"
    echo "export TRUBA_ADDR=$addrs"
    ;;
  status)
    "$bin" status --addr "$addrs"
    ;;
  join)
    dir=$(realpath -m "${3:-./truba-cluster}")
    [[ "${2:-}" =~ ^[4-9]$ ]] || die "join needs a node number from 4 to 9"
    write_joiner_config "$dir" "$2"
    start_node "$dir" "$2"
    echo "now: truba member add $2 --peer 127.0.0.1:741$2 --client 127.0.0.1:740$2"
    ;;
  kill)
    dir=$(realpath -m "${3:-./truba-cluster}")
    [ -n "${2:-}" ] || die "kill needs a node number"
    kill -KILL "$(cat "$dir/node$2.pid")" && echo "node $2 killed"
    ;;
  restart)
    dir=$(realpath -m "${3:-./truba-cluster}")
    [ -n "${2:-}" ] || die "restart needs a node number"
    start_node "$dir" "$2"
    ;;
  stop)
    dir=$(realpath -m "${2:-./truba-cluster}")
    for pid in "$dir"/node*.pid; do
      [ -f "$pid" ] && { kill -TERM "$(cat "$pid")" 2>/dev/null || true; }
    done
    for pid in "$dir"/node*.pid; do
      if [ -f "$pid" ]; then
        while alive "$(cat "$pid")"; do sleep 0.05; done
        rm -f "$pid"
      fi
    done
    echo "stopped"
    ;;
  *)
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
