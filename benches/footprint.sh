#!/usr/bin/env bash
# The sidecar's footprint, as a pod sees it (issue 26's resource requests, issue 27 item 4):
# the release binary in front of the simulator on loopback.
#   - exec to /readyz 200 (the pod's readiness gate), median of RUNS starts;
#   - resident memory idle (1 s after ready) and under load (wrk -t2 -c64, 5 s);
#   - resident memory idle with EXTRA more [[credential]]s (each with its own listener and
#     token): per extra credential.
# Stops by itself.
#
#   bash benches/footprint.sh                 # RUNS=5 EXTRA=4
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
EXTRA=${EXTRA:-4}
cargo build --release --quiet
BIN=target/release/genesys-auth-proxy
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh
command -v wrk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null

SIM_PORT=$(free_port)
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client bench:bench-secret \
  --api-rate-limit-per-minute 1000000000 --token-rate-limit-per-minute 1000000 >/dev/null 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$SIM_PORT/__sim/stats" >/dev/null 2>&1 && break; sleep 0.05; done
printf 'bench-secret\n' >"$WORK/secret"; chmod 600 "$WORK/secret"
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

# start CONF ADMIN_PORT: prints "PID MS" (exec to ready)
start() {
  local t0 pid
  t0=$(date +%s%N)
  "$BIN" run -c "$1" >"$WORK/proxy.log" 2>&1 &
  pid=$!
  for _ in $(seq 1000); do
    curl -sf "http://127.0.0.1:$2/readyz" >/dev/null 2>&1 && break
    sleep 0.005
  done
  echo "$pid $(( ($(date +%s%N) - t0) / 1000000 ))"
}

P=$(free_port); A=$(free_port)
write_bench_proxy_toml "$WORK/one.toml" "$P" "$A" "$SIM_PORT" "$WORK/secret" "$WORK/audit1.jsonl"
times=()
for _ in $(seq "$RUNS"); do
  read -r pid ms < <(start "$WORK/one.toml" "$A")
  times+=("$ms")
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
median=$(printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "exec to /readyz 200: median ${median} ms of ${RUNS} starts (${times[*]})"

read -r pid _ < <(start "$WORK/one.toml" "$A")
PIDS+=("$pid")
sleep 1
idle1=$(rss "$pid")
wrk -t2 -c64 -d5s "http://127.0.0.1:$P/api/v2/bench/echo" >"$WORK/wrk.txt" 2>&1 &
WRK=$!
sleep 4
loaded=$(rss "$pid")
wait "$WRK" || true
echo "one credential: ${idle1} KiB resident idle, ${loaded} KiB under wrk -t2 -c64 ($(awk '/Requests\/sec/ {print $2}' "$WORK/wrk.txt") req/s)"
kill "$pid"; wait "$pid" 2>/dev/null || true

P=$(free_port); A=$(free_port)
write_bench_proxy_toml "$WORK/many.toml" "$P" "$A" "$SIM_PORT" "$WORK/secret" "$WORK/audit2.jsonl"
for i in $(seq "$EXTRA"); do
  cat >>"$WORK/many.toml" <<TOML

[[credential]]
name = "extra$i"
listen = "127.0.0.1:$(free_port)"
[credential.genesys]
login_url = "http://127.0.0.1:$SIM_PORT"
api_url = "http://127.0.0.1:$SIM_PORT"
client_id = "bench"
client_secret = { file = "$WORK/secret" }
TOML
done
read -r pid ms < <(start "$WORK/many.toml" "$A")
PIDS+=("$pid")
sleep 1
idlen=$(rss "$pid")
echo "$((EXTRA + 1)) credentials: ${idlen} KiB resident idle (ready in ${ms} ms): $(( (idlen - idle1) / EXTRA )) KiB per extra credential"
