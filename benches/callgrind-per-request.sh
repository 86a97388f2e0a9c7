#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind. Unlike CPU time on
# a shared machine, the count hardly moves from run to run, so a change of a few percent shows.
# The kernel's share (syscalls, TCP) is not counted; benches/load-compare.sh measures that.
#
#   bash benches/callgrind-per-request.sh
#   BASELINE=/path/to/older/genesys-auth-proxy bash benches/callgrind-per-request.sh
#   TOP=25 bash benches/callgrind-per-request.sh     # also the 25 costliest functions (self)
#
# The proxy runs under callgrind in front of the simulator's echo path. wrk (8 connections,
# keep-alive) warms it up for 3 s; the counters are zeroed, then DURATION of traffic is counted
# and divided by the requests wrk made. Traffic stays on 127.0.0.1; everything started is stopped
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
TOP=${TOP:-0}
need() { command -v "$1" >/dev/null 2>&1; }
if ! need valgrind || ! need wrk; then
  apt-get update -qq && apt-get install -y -qq valgrind wrk >/dev/null
fi
cargo build --release --quiet
BIN=target/release/genesys-auth-proxy

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh
SIM_PORT=$(free_port)
SECRET="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client "bench:$SECRET" \
  --api-rate-limit-per-minute 1000000000 --token-rate-limit-per-minute 1000000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
printf '%s\n' "$SECRET" >"$WORK/secret"
chmod 600 "$WORK/secret"

# measure NAME BINARY: prints "NAME: N requests, I instructions/request".
measure() {
  local name=$1 bin=$2 port admin pid out n total
  port=$(free_port)
  admin=$(free_port)
  write_bench_proxy_toml "$WORK/$name.toml" "$port" "$admin" "$SIM_PORT" "$WORK/secret" "$WORK/$name-audit.jsonl"
  out="$WORK/$name.callgrind"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" run -c "$WORK/$name.toml" \
    >"$WORK/$name.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  for _ in $(seq 1 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$admin/readyz")" = 200 ] && break
    sleep 0.1
  done
  wrk -t1 -c8 -d3s "http://127.0.0.1:$port/api/v2/bench/echo" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  n=$(wrk -t1 -c8 -d"$DURATION" "http://127.0.0.1:$port/api/v2/bench/echo" | awk '/requests in/{print $1}')
  callgrind_control -d "$pid" >/dev/null 2>&1
  local dump
  for _ in $(seq 1 100); do
    dump=$(ls -t "$out".* 2>/dev/null | head -1 || true)
    [ -n "$dump" ] && grep -q '^totals:\|^summary:' "$dump" && break
    sleep 0.1
  done
  total=$(grep -E '^(summary|totals):' "$dump" | head -1 | awk '{print $2}')
  echo "$name: $n requests, $((total / n)) instructions/request"
  if [ "$TOP" -gt 0 ]; then
    # Skip the totals and the thread-entry frames callgrind charges the whole run to.
    callgrind_annotate --threshold=100 "$dump" 2>/dev/null | grep -E '^ *[0-9,]+ \(' |
      grep -vE '\((100\.0|9[0-9]\.[0-9]+)%\)' | head -"$TOP" | cut -c1-160
  fi
  kill "$pid" 2>/dev/null || true
}

measure current "$BIN"
if [ -n "${BASELINE:-}" ]; then
  measure baseline "$BASELINE"
fi
