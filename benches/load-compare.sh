#!/usr/bin/env bash
# Load comparison on loopback: the Genesys simulator alone (echo path), genesys-auth-proxy in
# front of it, and nginx in front of it injecting a static Authorization header (the reference
# for "as fast as nginx per request"). Each target gets the same wrk run; the script prints
# requests/s, p50 and p99 side by side and the proxy/nginx ratios.
#
#   bash benches/load-compare.sh            # 10 s per target, 2 threads, 64 connections
#   DURATION=20s CONNECTIONS=128 bash benches/load-compare.sh
#
# Installs nginx and wrk from Debian packages when missing. Traffic stays on 127.0.0.1; every
# process it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
PATH_UNDER_TEST=${PATH_UNDER_TEST:-/api/v2/bench/echo}

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx || ! need wrk; then
  apt-get update -qq && apt-get install -y -qq nginx wrk >/dev/null
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

cargo build --release --quiet
BIN=target/release/genesys-auth-proxy

WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] && echo "kept $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "timeout waiting for $1" >&2; exit 1; }

SIM_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port); NGINX_PORT=$(free_port)
SECRET="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"

"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client "bench:$SECRET" \
  --api-rate-limit-per-minute 1000000000 --token-rate-limit-per-minute 1000000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$SIM_PORT/__sim/stats"

# A token for the direct and nginx runs (nginx injects it as a static header).
TOKEN=$(curl -s -u "bench:$SECRET" -d grant_type=client_credentials "http://127.0.0.1:$SIM_PORT/oauth/token" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')

printf '%s\n' "$SECRET" >"$WORK/secret"; chmod 600 "$WORK/secret"
cat >"$WORK/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[genesys]
login_url = "http://127.0.0.1:$SIM_PORT"
api_url = "http://127.0.0.1:$SIM_PORT"
client_id = "bench"
client_secret = { file = "$WORK/secret" }
[audit]
path = "$WORK/audit.jsonl"
[log]
level = "warn"
EOF
"$BIN" run -c "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ADMIN_PORT/readyz")" = 200 ] && break; sleep 0.05; done

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
}
EOF
"$NGINX" -c "$WORK/nginx.conf" -p "$WORK" -g 'daemon on;'
wait_http "http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"

# Sanity: every target answers 200 through the same path.
for url in "http://127.0.0.1:$PROXY_PORT$PATH_UNDER_TEST" "http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$url")
  [ "$code" = 200 ] || { echo "$url answered $code" >&2; exit 1; }
done

run_wrk() { # name url [extra header]
  local name=$1 url=$2; shift 2
  local out
  out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url")
  local rps p50 p99 errors
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-22s %12s %10s %10s  %s\n' "$name" "$rps" "$p50" "$p99" "$errors"
  echo "$name $rps $p50 $p99" >>"$WORK/results"
}

echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, path $PATH_UNDER_TEST, $(nproc) cores"
printf '%-22s %12s %10s %10s\n' target requests/s p50 p99
run_wrk "simulator (direct)" "http://127.0.0.1:$SIM_PORT$PATH_UNDER_TEST" -H "Authorization: Bearer $TOKEN"
run_wrk "genesys-auth-proxy" "http://127.0.0.1:$PROXY_PORT$PATH_UNDER_TEST"
run_wrk "nginx (static header)" "http://127.0.0.1:$NGINX_PORT$PATH_UNDER_TEST"

python3 - "$WORK/results" <<'EOF'
import re, sys
def ms(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    n, u = float(m.group(1)), m.group(2)
    return n / 1000 if u == "us" else n * 1000 if u == "s" else n
rows = {}
for line in open(sys.argv[1]):
    parts = line.split()
    rows[" ".join(parts[:-3])] = parts[-3:]
p, n = rows["genesys-auth-proxy"], rows["nginx (static header)"]
print(f"ratio proxy/nginx: throughput {float(p[0]) / float(n[0]):.2f}x, "
      f"p50 {ms(p[1]) / ms(n[1]):.2f}x, p99 {ms(p[2]) / ms(n[2]):.2f}x (lower latency ratio is better)")
EOF
echo "proxy errors logged: $(grep -c -i '"level":"ERROR"' "$WORK/proxy.log" || true)"
