#!/usr/bin/env bash
# Issue 21's figures, as a user would see them: the simulator and one proxy process on
# loopback, the secret in a watched 0644 file.
#   1. one atomic rename (`mv`) of the unchanged secret: reloads in the next 5 s;
#   2. a Kubernetes `..data` swap to a new, valid secret: reloads in the next 5 s;
#   3. a rotation to a secret the token endpoint refuses: refused token requests in the next
#      60 s (shipped backoff defaults), while requests keep being served.
# Stops by itself (about 75 s).
#
#   bash benches/rotation-settle.sh            # debug build
#   PROFILE=release bash benches/rotation-settle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-debug}
REFUSED_SECONDS=${REFUSED_SECONDS:-60}
if [ "$PROFILE" = release ]; then cargo build --release --quiet; else cargo build --quiet; fi
BIN=target/$PROFILE/genesys-auth-proxy
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh

start_sim "$BIN" --client bench:bench-secret

# A Kubernetes secret volume: client-secret -> ..data/client-secret, ..data -> ..1.
VOL="$WORK/volume"
mkdir -p "$VOL/..1"
printf 'bench-secret\n' >"$VOL/..1/client-secret"; chmod 644 "$VOL/..1/client-secret"
ln -s ..1 "$VOL/..data"; ln -s ..data/client-secret "$VOL/client-secret"
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
client_secret = { file = "$VOL/client-secret" }
[audit]
path = "$WORK/audit.jsonl"
[log]
format = "json"
level = "info"
TOML
"$BIN" run -c "$WORK/proxy.toml" 2>"$WORK/proxy.log" &
PIDS+=($!)
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$A/readyz" >/dev/null 2>&1 && break; sleep 0.05; done

reloads() { curl -s "http://127.0.0.1:$A/metrics" | awk '/^genesys_proxy_config_reloads_total\{/ {s+=$2} END {print s+0}'; }
refused() { curl -s "$SIM/__sim/stats" | jq '.token_requests.by_outcome.invalid_client // 0'; }
swap() { # $1 = stamp, $2 = secret
  mkdir -p "$VOL/..$1"; printf '%s\n' "$2" >"$VOL/..$1/client-secret"; chmod 644 "$VOL/..$1/client-secret"
  ln -sfn "..$1" "$VOL/..data_tmp"; mv -T "$VOL/..data_tmp" "$VOL/..data"
}

# 1. mv of the same bytes (in the directory the proxy watches: the target of the link).
before=$(reloads)
printf 'bench-secret\n' >"$VOL/client-secret.new"; chmod 644 "$VOL/client-secret.new"
rm "$VOL/client-secret"; mv "$VOL/client-secret.new" "$VOL/client-secret"
sleep 5
echo "1. atomic rename of the unchanged secret: $(( $(reloads) - before )) reloads in 5 s"

# 2. ..data swap to a new valid secret.
curl -s -X POST "$SIM/__sim/clients/bench/secrets" -H 'content-type: application/json' -d '{"secret":"bench-secret-2"}' >/dev/null
before=$(reloads)
swap 2 bench-secret-2
rm "$VOL/client-secret"; ln -s ..data/client-secret "$VOL/client-secret"
sleep 5
echo "2. Kubernetes ..data swap to a new secret: $(( $(reloads) - before )) reloads in 5 s, rotations $(curl -s "http://127.0.0.1:$A/metrics" | awk '/secret_rotations_total\{outcome="success"\}/ {print $2}')"

# 3. a refused new secret.
before_refused=$(refused); before=$(reloads)
swap 3 never-active-secret
ok=0; failed=0; end=$((SECONDS + REFUSED_SECONDS))
while [ $SECONDS -lt $end ]; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P/api/v2/users/me")
  if [ "$code" = 200 ]; then ok=$((ok + 1)); else failed=$((failed + 1)); fi
  sleep 0.2
done
echo "3. refused new secret: $(( $(refused) - before_refused )) refused token requests in ${REFUSED_SECONDS} s, $(( $(reloads) - before )) reloads, requests $ok ok / $failed failed"
echo "   next attempt: $(curl -s "http://127.0.0.1:$A/status" | jq -r '.rotation.next_attempt_at')"
echo "   mode warnings logged: $(grep -c 'readable by group or others' "$WORK/proxy.log")"
