#!/usr/bin/env bash
# Token requests per revocation, standalone vs [cluster], with 1, 3 and 10 replicas: the
# simulator, a real redis-server and N real proxy processes on loopback. Each replica serves
# traffic (20 requests) before and after a revoke-all of the client's tokens; the script prints
# the token requests the revocation cost and the requests that failed. Stops by itself.
#
#   bash benches/cluster-revoke.sh            # debug build
#   PROFILE=release bash benches/cluster-revoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
REPLICAS=${REPLICAS:-"1 3 10"}
if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN=target/$PROFILE/genesys-auth-proxy
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh

start_sim "$BIN" --client bench:bench-secret
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
printf 'bench-secret\n' >"$WORK/secret"; chmod 600 "$WORK/secret"

tokens() { curl -s "$SIM/__sim/stats" | jq '.token_requests.by_outcome.success // 0'; }

run() { # $1 = replicas, $2 = standalone|cluster
  local n=$1 mode=$2 ports=() admins=() pids=()
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  local base; base=$(tokens)
  for i in $(seq "$n"); do
    local p a conf="$WORK/r$i.toml"
    p=$(free_port); a=$(free_port)
    cat >"$conf" <<TOML
[proxy]
listen = "127.0.0.1:$p"
threads = 1
[admin]
listen = "127.0.0.1:$a"
[genesys]
login_url = "$SIM"
api_url = "$SIM"
client_id = "bench"
client_secret = { file = "$WORK/secret" }
[audit]
path = "$WORK/audit-$i.jsonl"
[log]
level = "error"
TOML
    if [ "$mode" = cluster ]; then printf '[cluster]\nredis_url = "redis://127.0.0.1:%s/0"\n' "$REDIS_PORT" >>"$conf"; fi
    "$BIN" run -c "$conf" >/dev/null 2>&1 &
    pids+=($!); ports+=("$p"); admins+=("$a")
  done
  for a in "${admins[@]}"; do
    for _ in $(seq 400); do
      [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$a/readyz")" = 200 ] && break
      sleep 0.05
    done
  done
  local ready; ready=$(tokens)
  curl -s -X POST "$SIM/__sim/revoke" -d '{"client_id":"bench"}' >/dev/null
  # 20 requests per replica, all replicas at once: every replica meets the 401.
  for p in "${ports[@]}"; do for _ in $(seq 20); do echo "http://127.0.0.1:$p/api/v2/bench"; done; done |
    xargs -P 16 -n 1 curl -s -o /dev/null -w '%{http_code}\n' >"$WORK/codes"
  local failed sent after
  sent=$(wc -l <"$WORK/codes"); failed=$(grep -vc '^200$' "$WORK/codes" || true)
  if [ "$failed" != 0 ]; then
    sort "$WORK/codes" | uniq -c | tr '\n' ' ' >&2; echo >&2
    if [ -n "${DEBUG:-}" ]; then
      for a in "${admins[@]}"; do curl -s "http://127.0.0.1:$a/metrics" | grep -E '^genesys_proxy_(replays_total|token_requests_total)' | grep -v ' 0$' >&2; done
    fi
  fi
  after=$(tokens)
  printf '%-10s replicas=%-3s startup_token_requests=%-3s revoke_token_requests=%-3s requests=%s failed=%s\n' \
    "$mode" "$n" "$((ready - base))" "$((after - ready))" "$sent" "$failed"
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

for n in $REPLICAS; do
  for mode in standalone cluster; do
    run "$n" "$mode"
  done
done
