#!/usr/bin/env bash
# Issue 25's endpoint-limit figure, as a user would see it: the simulator with an endpoint
# limit on analytics queries (2 per 30 s over every token) and one proxy process (pool of 2,
# max_queue_wait_ms 500) on loopback. Three queries meet the limit; then for SECONDS (5) one
# client calls another route (GET /api/v2/users) back to back: how many are served, how many
# get a 429, and how many times Genesys answered the endpoint 429. Stops by itself.
#
#   bash benches/endpoint-hold.sh                  # debug build of this tree
#   BIN=/path/to/other/genesys-auth-proxy bash benches/endpoint-hold.sh   # another proxy build
#
# The simulator is always this tree's (it has --endpoint-limit); BIN only changes the proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_RUN=${SECONDS_RUN:-5}
cargo build --quiet
SIM_BIN=target/debug/genesys-auth-proxy
BIN=${BIN:-$SIM_BIN}
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh

start_sim "$SIM_BIN" --client bench:bench-secret --endpoint-limit /api/v2/analytics=2/30
printf 'bench-secret\n' >"$WORK/secret"; chmod 600 "$WORK/secret"
P=$(free_port); A=$(free_port)
cat >"$WORK/proxy.toml" <<TOML
[proxy]
listen = "127.0.0.1:$P"
[admin]
listen = "127.0.0.1:$A"
[genesys]
login_url = "$SIM"
api_url = "$SIM"
client_id = "bench"
client_secret = { file = "$WORK/secret" }
[token]
pool_size = 2
[budget]
max_queue_wait_ms = 500
[audit]
path = "$WORK/audit.jsonl"
[log]
format = "json"
level = "warn"
TOML
"$BIN" run -c "$WORK/proxy.toml" 2>"$WORK/proxy.log" &
PIDS+=($!)
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$A/readyz" >/dev/null 2>&1 && break; sleep 0.05; done
sleep 0.5 # the second pool token
Q=/api/v2/analytics/conversations/details/query
for _ in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' -X POST -d '{}' "http://127.0.0.1:$P$Q"; done
echo "(three analytics queries)"
ok=0; limited=0; other=0
end=$((SECONDS + SECONDS_RUN))
while [ $SECONDS -lt $end ]; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P/api/v2/users")
  case $code in 200) ok=$((ok+1));; 429) limited=$((limited+1));; *) other=$((other+1));; esac
done
endpoint=$(curl -s "$SIM/__sim/stats" | jq '.api_requests.endpoint_limited')
echo "while $Q was limited, GET /api/v2/users for ${SECONDS_RUN} s: $ok served, $limited got 429, $other other; Genesys endpoint 429s: $endpoint"
