#!/usr/bin/env bash
# Load comparison on loopback: the Genesys simulator alone (echo path), and in front of it
# genesys-auth-proxy, a bare pingora proxy (benches/bare_pingora.rs: a static header, nothing
# else: pingora's own cost), nginx and haproxy (static Authorization header: the references for
# "as fast as nginx per request"). Each target gets the same wrk run; the script prints
# requests/s, p50, p99 and the proxy process's CPU per request (utime+stime over the run divided
# by the requests wrk counted; for the simulator row, the simulator's own), then ratios computed
# within each run.
#
#   bash benches/load-compare.sh            # 10 s per target, 2 threads, 64 connections
#   RUNS=3 DURATION=20s CONNECTIONS=128 bash benches/load-compare.sh
#   PERF=1 bash benches/load-compare.sh     # also the perf top 10 of the proxy (first run)
#   ONLY=nginx bash benches/load-compare.sh # only the targets whose name matches
#   APPS=1 bash benches/load-compare.sh    # also the proxy with [[app]]: callers proving
#                                           # themselves with an API key, and with a proxy
#                                           # token from their own login
#   TRACING=1 bash benches/load-compare.sh  # also the proxy with [tracing]: sampling 1.0 and
#                                           # 0.01 into a collector that takes every batch
#                                           # (an nginx location answering 200), and 1.0 with
#                                           # the collector down (connection refused); its RSS
#                                           # before and after, and the spans' outcomes
#   BASELINE=/path/to/older/genesys-auth-proxy bash benches/load-compare.sh
#                                           # also an older build, same config: before/after
#                                           # ratios within each run
#
# cs/req: context switches (voluntary + involuntary) of the target per request.
#
# Installs nginx, haproxy and wrk from Debian packages when missing. Traffic stays on 127.0.0.1;
# every process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
PATH_UNDER_TEST=${PATH_UNDER_TEST:-/api/v2/bench/echo}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk || ! need haproxy; then
  apt-get update -qq && apt-get install -y -qq nginx-light haproxy wrk >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
RUNS=${RUNS:-1}

cargo build --release --quiet
cargo build --release --quiet --example bare-pingora
BIN=target/release/genesys-auth-proxy
BARE=target/release/examples/bare-pingora

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; exit 1; }

SIM_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port); NGINX_PORT=$(free_port)
BARE_PORT=$(free_port); HAPROXY_PORT=$(free_port); OTLP_PORT=$(free_port)
SECRET="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client "bench:$SECRET" \
  --api-rate-limit-per-minute 1000000000 --token-rate-limit-per-minute 1000000 >"$WORK/sim.log" 2>&1 &
SIM_PID=$!
PIDS+=($SIM_PID)
wait_http "http://127.0.0.1:$SIM_PORT/__sim/stats"

# A token for the direct and nginx runs (nginx injects it as a static header).
TOKEN=$(curl -s -u "bench:$SECRET" -d grant_type=client_credentials "http://127.0.0.1:$SIM_PORT/oauth/token" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

printf '%s\n' "$SECRET" >"$WORK/secret"; chmod 600 "$WORK/secret"
write_bench_proxy_toml "$WORK/proxy.toml" "$PROXY_PORT" "$ADMIN_PORT" "$SIM_PORT" "$WORK/secret" "$WORK/audit.jsonl"
"$BIN" run -c "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=($PROXY_PID)
for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz")" = 200 ] && break; sleep 0.05; done

if [ -n "${APPS:-}" ]; then
  APPS_PORT=$(free_port); APPS_ADMIN=$(free_port)
  APP_KEY="bench-key-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  APP_SECRET="bench-app-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  head -c 48 /dev/urandom | base64 >"$WORK/app-token-key"; chmod 600 "$WORK/app-token-key"
  printf '%s\n' "$APP_SECRET" >"$WORK/app-secret"; chmod 600 "$WORK/app-secret"
  sed -e "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$APPS_PORT/" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$APPS_ADMIN/" \
    -e "s|$WORK/audit.jsonl|$WORK/audit-apps.jsonl|" "$WORK/proxy.toml" >"$WORK/apps.toml"
  cat >>"$WORK/apps.toml" <<TOML
[apps]
token_key = { file = "$WORK/app-token-key" }
[[app]]
name = "bench-key"
api_key_sha256 = ["$(printf %s "$APP_KEY" | sha256sum | cut -d' ' -f1)"]
[[app]]
name = "bench-login"
client_id = "bench-app"
client_secret = { file = "$WORK/app-secret" }
TOML
  "$BIN" run -c "$WORK/apps.toml" >"$WORK/apps.log" 2>&1 &
  APPS_PID=$!
  PIDS+=($APPS_PID)
  for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$APPS_ADMIN/readyz")" = 200 ] && break; sleep 0.05; done
  APP_TOKEN=$(curl -s -u "bench-app:$APP_SECRET" -d grant_type=client_credentials "http://127.0.0.1:$APPS_PORT/oauth/token" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  for h in "$APP_KEY" "$APP_TOKEN"; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $h" "http://127.0.0.1:$APPS_PORT$PATH_UNDER_TEST")
    [ "$code" = 200 ] || { echo "the [[app]] proxy answered $code" >&2; exit 1; }
  done
fi

# start_variant NAME TOML_TAIL: another proxy, same config plus TOML_TAIL, on its own ports;
# sets VARIANT_PID, VARIANT_PORT and VARIANT_ADMIN.
start_variant() {
  local name=$1 tail=$2
  VARIANT_PORT=$(free_port); VARIANT_ADMIN=$(free_port)
  sed -e "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$VARIANT_PORT/" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$VARIANT_ADMIN/" \
    -e "s|$WORK/audit.jsonl|$WORK/audit-$name.jsonl|" "$WORK/proxy.toml" >"$WORK/$name.toml"
  printf '%s\n' "$tail" >>"$WORK/$name.toml"
  "$BIN" run -c "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
  VARIANT_PID=$!
  PIDS+=($VARIANT_PID)
  for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$VARIANT_ADMIN/readyz")" = 200 ] && break; sleep 0.05; done
}
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

if [ -n "${TRACING:-}" ]; then
  # The collector is the nginx below (a location that takes the body and answers 200), so the
  # export thread never waits on a slow receiver; "down" is a port nothing listens on.
  DOWN_PORT=$(free_port)
  start_variant trace-full "$(printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0' "$OTLP_PORT")"
  TRACE_FULL_PID=$VARIANT_PID; TRACE_FULL_PORT=$VARIANT_PORT; TRACE_FULL_ADMIN=$VARIANT_ADMIN
  start_variant trace-sampled "$(printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 0.01' "$OTLP_PORT")"
  TRACE_SAMPLED_PID=$VARIANT_PID; TRACE_SAMPLED_PORT=$VARIANT_PORT; TRACE_SAMPLED_ADMIN=$VARIANT_ADMIN
  start_variant trace-down "$(printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = 1.0' "$DOWN_PORT")"
  TRACE_DOWN_PID=$VARIANT_PID; TRACE_DOWN_PORT=$VARIANT_PORT; TRACE_DOWN_ADMIN=$VARIANT_ADMIN
fi

if [ -n "${BASELINE:-}" ]; then
  BASE_PORT=$(free_port); BASE_ADMIN=$(free_port)
  sed -e "s/127.0.0.1:$PROXY_PORT/127.0.0.1:$BASE_PORT/" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$BASE_ADMIN/" \
    -e "s|$WORK/audit.jsonl|$WORK/audit-baseline.jsonl|" "$WORK/proxy.toml" >"$WORK/baseline.toml"
  "$BASELINE" run -c "$WORK/baseline.toml" >"$WORK/baseline.log" 2>&1 &
  BASE_PID=$!
  PIDS+=($BASE_PID)
  for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$BASE_ADMIN/readyz")" = 200 ] && break; sleep 0.05; done
fi

"$BARE" "127.0.0.1:$BARE_PORT" "127.0.0.1:$SIM_PORT" "Bearer $TOKEN" 2 >"$WORK/bare.log" 2>&1 &
BARE_PID=$!
PIDS+=($BARE_PID)
wait_http "http://127.0.0.1:$BARE_PORT$PATH_UNDER_TEST"

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend bench
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend sim
backend sim
  http-reuse always
  http-request set-header Authorization "Bearer $TOKEN"
  server sim 127.0.0.1:$SIM_PORT
EOF
"$HAPROXY" -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=($HAPROXY_PID)
wait_http "http://127.0.0.1:$HAPROXY_PORT$PATH_UNDER_TEST"

cat >"$WORK/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream sim { server 127.0.0.1:$SIM_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://sim;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host 127.0.0.1:$SIM_PORT;
      proxy_set_header Authorization "Bearer $TOKEN";
    }
  }
  server {
    listen 127.0.0.1:$OTLP_PORT;
    client_max_body_size 64m;
    client_body_buffer_size 4m;
    location / { return 200 ""; }
  }
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon on;'
wait_http "http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"

NGINX_PIDS="$(cat "$WORK/nginx.pid") $(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')"

# Sanity: every target answers 200 through the same path.
for port in $PROXY_PORT $NGINX_PORT $BARE_PORT $HAPROXY_PORT; do
  url="http://127.0.0.1:$port$PATH_UNDER_TEST"
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  [ "$code" = 200 ] || { echo "$url answered $code" >&2; exit 1; }
done

# CPU time (utime + stime, all threads) of the given processes, in clock ticks.
cpu_ticks() {
  local total=0 pid ut st
  for pid in "$@"; do
    # Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    read -r ut st < <(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12, $13}')
    total=$((total + ut + st))
  done
  echo "$total"
}
TICK=$(getconf CLK_TCK)

# Context switches (voluntary + involuntary, all live threads) of the given processes.
ctx_switches() {
  local total=0 pid n
  for pid in "$@"; do
    n=$(cat /proc/"$pid"/task/*/status 2>/dev/null |
      awk '/^(non)?voluntary_ctxt_switches/ {s += $2} END {print s + 0}')
    total=$((total + n))
  done
  echo "$total"
}

run_wrk() { # name "pids" url [extra header]
  local name=$1 pids=$2 url=$3; shift 3
  local out before after cs_before cs_after
  if [ -n "${ONLY:-}" ] && ! grep -qi -- "$ONLY" <<<"$name"; then return 0; fi
  # shellcheck disable=SC2086
  before=$(cpu_ticks $pids)
  # shellcheck disable=SC2086
  cs_before=$(ctx_switches $pids)
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url")
  # shellcheck disable=SC2086
  after=$(cpu_ticks $pids)
  # shellcheck disable=SC2086
  cs_after=$(ctx_switches $pids)
  local rps p50 p99 errors requests cpu_us cs
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  cpu_us=$(python3 -c "print(f'{($after - $before) / $TICK * 1e6 / $requests:.1f}')")
  cs=$(python3 -c "print(f'{($cs_after - $cs_before) / $requests:.2f}')")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-24s %12s %10s %10s %12s %10s  %s\n' "$name" "$rps" "$p50" "$p99" "$cpu_us" "$cs" "$errors"
  echo "$RUN|$name|$rps|$p50|$p99|$cpu_us" >>"$WORK/results"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, path $PATH_UNDER_TEST, $(nproc) cores, $RUNS run(s)"
for RUN in $(seq "$RUNS"); do
  echo "-- run $RUN"
  printf '%-24s %12s %10s %10s %12s %10s\n' target requests/s p50 p99 "cpu us/req" "cs/req"
  run_wrk "simulator (direct)" "$SIM_PID" "http://127.0.0.1:$SIM_PORT$PATH_UNDER_TEST" -H "Authorization: Bearer $TOKEN"
  run_wrk "bare pingora" "$BARE_PID" "http://127.0.0.1:$BARE_PORT$PATH_UNDER_TEST"
  if [ -n "${PERF:-}" ] && [ "$RUN" = 1 ]; then
    perf record -q -F 499 -g -p "$PROXY_PID" -o "$WORK/perf.data" -- sleep 5 >/dev/null 2>&1 &
    PERF_PID=$!
  fi
  run_wrk "genesys-auth-proxy" "$PROXY_PID" "http://127.0.0.1:$PROXY_PORT$PATH_UNDER_TEST"
  if [ -n "${PERF_PID:-}" ]; then
    wait "$PERF_PID" || true
    unset PERF_PID
  fi
  if [ -n "${BASE_PID:-}" ]; then
    run_wrk "baseline build" "$BASE_PID" "http://127.0.0.1:$BASE_PORT$PATH_UNDER_TEST"
  fi
  if [ -n "${APPS_PID:-}" ]; then
    run_wrk "proxy, app api key" "$APPS_PID" "http://127.0.0.1:$APPS_PORT$PATH_UNDER_TEST" -H "Authorization: Bearer $APP_KEY"
    run_wrk "proxy, app token" "$APPS_PID" "http://127.0.0.1:$APPS_PORT$PATH_UNDER_TEST" -H "Authorization: Bearer $APP_TOKEN"
  fi
  if [ -n "${TRACE_FULL_PID:-}" ]; then
    [ "$RUN" = 1 ] && DOWN_RSS_BEFORE=$(rss_kb "$TRACE_DOWN_PID")
    run_wrk "proxy, tracing 1.0" "$TRACE_FULL_PID" "http://127.0.0.1:$TRACE_FULL_PORT$PATH_UNDER_TEST"
    run_wrk "proxy, tracing 0.01" "$TRACE_SAMPLED_PID" "http://127.0.0.1:$TRACE_SAMPLED_PORT$PATH_UNDER_TEST"
    run_wrk "proxy, collector down" "$TRACE_DOWN_PID" "http://127.0.0.1:$TRACE_DOWN_PORT$PATH_UNDER_TEST"
    DOWN_RSS_RUNS="${DOWN_RSS_RUNS:-} $(rss_kb "$TRACE_DOWN_PID")"
  fi
  run_wrk "nginx (static header)" "$NGINX_PIDS" "http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"
  run_wrk "haproxy (static header)" "$HAPROXY_PID" "http://127.0.0.1:$HAPROXY_PORT$PATH_UNDER_TEST"
done

python3 - "$WORK/results" <<'EOF'
import re, sys
from collections import defaultdict
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n
runs = defaultdict(dict)
for line in open(sys.argv[1]):
    run, name, rps, p50, p99, cpu = line.strip().split("|")
    runs[run][name] = (float(rps), ms(p50), ms(p99), float(cpu))
def ratio(a, b, run):
    x, y = runs[run][a], runs[run][b]
    return (f"cpu/req {x[3] / y[3]:.2f}x, throughput {x[0] / y[0]:.2f}x, "
            f"p50 {x[1] / y[1]:.2f}x, p99 {x[2] / y[2]:.2f}x")
def show(label, a, b, run):
    # Only the pairs both of which ran (ONLY= may leave some out).
    if a in runs[run] and b in runs[run]:
        print(f"run {run}: {label} {ratio(a, b, run)}")
for run in sorted(runs):
    show("proxy/nginx  ", "genesys-auth-proxy", "nginx (static header)", run)
    show("proxy/haproxy", "genesys-auth-proxy", "haproxy (static header)", run)
    show("proxy/bare   ", "genesys-auth-proxy", "bare pingora", run)
    show("bare/nginx   ", "bare pingora", "nginx (static header)", run)
    for app in ("proxy, app api key", "proxy, app token"):
        show(f"{app} / proxy", app, "genesys-auth-proxy", run)
    for t in ("proxy, tracing 1.0", "proxy, tracing 0.01", "proxy, collector down"):
        show(f"{t} / proxy", t, "genesys-auth-proxy", run)
    show("proxy/baseline", "genesys-auth-proxy", "baseline build", run)
    show("baseline/nginx", "baseline build", "nginx (static header)", run)
EOF
echo "proxy errors logged: $(grep -c -i '"level":"ERROR"' "$WORK/proxy.log" || true)"
if [ -n "${TRACE_FULL_PID:-}" ]; then
  for v in full:$TRACE_FULL_ADMIN sampled:$TRACE_SAMPLED_ADMIN down:$TRACE_DOWN_ADMIN; do
    echo "tracing ${v%%:*}: $(curl -s "http://127.0.0.1:${v#*:}/metrics" | grep '^genesys_proxy_trace' | sed 's/genesys_proxy_trace_//' | tr '\n' ' ')"
  done
  echo "collector down: RSS $DOWN_RSS_BEFORE kB before its first run; after each run (kB):$DOWN_RSS_RUNS"
  echo "proxy without tracing: RSS (kB) now: $(rss_kb "$PROXY_PID")"
fi
if [ -f "$WORK/perf.data" ]; then
  echo "perf top 10 (genesys-auth-proxy, self time, first run):"
  perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
    grep -E '^ +[0-9.]+%' | sed -E 's/[ -]+$//' | head -10
fi
