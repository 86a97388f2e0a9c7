#!/usr/bin/env bash
# What TLS and each app proof cost the proxy: CPU per request (utime+stime of the proxy process
# over the run / requests wrk counted) and throughput, on loopback, one invocation:
#   plain HTTP, keep-alive                    (the reference)
#   TLS, keep-alive                           (per-request cost of TLS)
#   TLS, a new connection per request         (+ the handshake)
#   mTLS (client certificate proof), keep-alive and per request
#   API key / workload token (JWT, remembered after its first check), over TLS keep-alive
# Certificates are made with the openssl CLI; the workload token with PyJWT (bash .ci/sdks).
#
#   bash benches/tls-cost.sh              # 10 s per row, wrk -t2 -c32
#   DURATION=20s CONNECTIONS=64 bash benches/tls-cost.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
bash .ci/sdks >/dev/null
cargo build --release --quiet
BIN=target/release/genesys-auth-proxy
WORK=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# shellcheck source=benches/bench-proxy.sh
. benches/bench-proxy.sh

cd "$WORK"
ossl() { openssl "$@" >/dev/null 2>&1; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -subj /CN=bench-ca -days 2
issue() { # name san
  ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
  printf 'subjectAltName=%s\n' "$2" >"$1.ext"
  ossl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 2 -extfile "$1.ext"
}
issue server "DNS:localhost,IP:127.0.0.1"
issue client "URI:spiffe://bench/ns/a/sa/b"
cd - >/dev/null

SIM_PORT=$(free_port); PLAIN=$(free_port); PLAIN_ADMIN=$(free_port); TLS=$(free_port); TLS_ADMIN=$(free_port)
SECRET="bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
KEY="bench-key-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client "bench:$SECRET" --api-rate-limit-per-minute 1000000000 >"$WORK/sim.log" 2>&1 &
PIDS+=($!)
printf '%s\n' "$SECRET" >"$WORK/secret"; chmod 600 "$WORK/secret"
head -c 48 /dev/urandom | base64 >"$WORK/token-key"; chmod 600 "$WORK/token-key"

# The workload token's issuer (PyJWT); it serves its JWKS while the bench runs.
coproc ISSUER { PYTHONPATH=target/sdk/python exec python3 tests/sdk/jose_issuer.py genesys-auth-proxy system:serviceaccount:a:b; }
read -r ISSUED <&"${ISSUER[0]}"
PIDS+=("$ISSUER_PID")
ISS=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["issuer"])' "$ISSUED")
JWT=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["tokens"]["good"])' "$ISSUED")

write_bench_proxy_toml "$WORK/plain.toml" "$PLAIN" "$PLAIN_ADMIN" "$SIM_PORT" "$WORK/secret" "$WORK/audit-plain.jsonl"
write_bench_proxy_toml "$WORK/tls.toml" "$TLS" "$TLS_ADMIN" "$SIM_PORT" "$WORK/secret" "$WORK/audit-tls.jsonl"
cat >>"$WORK/tls.toml" <<TOML
[proxy.tls]
cert_file = "$WORK/server.crt"
key_file = "$WORK/server.key"
client_ca_file = "$WORK/ca.crt"
[apps]
token_key = { file = "$WORK/token-key" }
[[app]]
name = "mtls"
mtls_subjects = ["spiffe://bench/ns/a/sa/b"]
[[app]]
name = "key"
api_key_sha256 = ["$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"]
[[app]]
name = "workload"
jwt = { issuer = "$ISS", audience = "genesys-auth-proxy", subjects = ["system:serviceaccount:a:b"] }
TOML
"$BIN" run -c "$WORK/plain.toml" >"$WORK/plain.log" 2>&1 & PLAIN_PID=$!; PIDS+=($PLAIN_PID)
"$BIN" run -c "$WORK/tls.toml" >"$WORK/tls.log" 2>&1 & TLS_PID=$!; PIDS+=($TLS_PID)
for a in $PLAIN_ADMIN $TLS_ADMIN; do
  for _ in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$a/readyz")" = 200 ] && break; sleep 0.05; done
done
P=/api/v2/bench/echo
CURL_TLS=(--cacert "$WORK/ca.crt")
for h in "Authorization: Bearer $KEY" "Authorization: Bearer $JWT"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "${CURL_TLS[@]}" -H "$h" "https://localhost:$TLS$P")
  [ "$code" = 200 ] || { echo "TLS proxy answered $code" >&2; exit 1; }
done
code=$(curl -s -o /dev/null -w '%{http_code}' "${CURL_TLS[@]}" --cert "$WORK/client.crt" --key "$WORK/client.key" "https://localhost:$TLS$P")
[ "$code" = 200 ] || { echo "mTLS answered $code" >&2; exit 1; }

# wrk cannot present a client certificate, so the mTLS rows use curl's parallel mode (a new
# handshake per transfer, or connections reused), beside an API-key row made the same way.
ticks() { read -r ut st < <(sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}'); echo $((ut + st)); }
TICK=$(getconf CLK_TCK)
row() { # name pid requests-fn...
  local name=$1 pid=$2; shift 2
  local before after n
  before=$(ticks "$pid")
  n=$("$@")
  after=$(ticks "$pid")
  python3 -c "import sys; n=int(sys.argv[2]); print(f'{sys.argv[1]:<44} {n:>8} req  {(int(sys.argv[4])-int(sys.argv[3]))/int(sys.argv[5])*1e6/max(n,1):>8.1f} cpu us/req')" \
    "$name" "$n" "$before" "$after" "$TICK"
}
wrk_n() { wrk -t2 -c"$CONNECTIONS" -d"$DURATION" "$@" | awk '/requests in/ {print $1}'; }
curl_n() { # n extra-curl-args...: n requests, 16 in parallel
  local n=$1; shift
  seq "$n" | sed "s|.*|url = \"https://localhost:$TLS$P\"\noutput = \"/dev/null\"|" >"$WORK/urls"
  curl -s --no-progress-meter -Z --parallel-max 16 "${CURL_TLS[@]}" "$@" -K "$WORK/urls" >/dev/null 2>&1
  echo "$n"
}
N=${CURL_REQUESTS:-3000}
echo "wrk -t2 -c$CONNECTIONS -d$DURATION, curl -Z (16 parallel) x $N; path $P; $(nproc) cores"
row "plain HTTP, keep-alive (wrk)" $PLAIN_PID wrk_n "http://127.0.0.1:$PLAIN$P"
row "TLS + API key, keep-alive (wrk)" $TLS_PID wrk_n -H "Authorization: Bearer $KEY" "https://localhost:$TLS$P"
row "TLS + API key, new connection each (wrk)" $TLS_PID wrk_n -H "Connection: close" -H "Authorization: Bearer $KEY" "https://localhost:$TLS$P"
row "TLS + workload token, keep-alive (wrk)" $TLS_PID wrk_n -H "Authorization: Bearer $JWT" "https://localhost:$TLS$P"
row "mTLS, connections reused (curl)" $TLS_PID curl_n "$N" --cert "$WORK/client.crt" --key "$WORK/client.key"
row "mTLS, new connection each (curl)" $TLS_PID curl_n "$N" --cert "$WORK/client.crt" --key "$WORK/client.key" -H "Connection: close"
row "TLS + API key, new connection each (curl)" $TLS_PID curl_n "$N" -H "Authorization: Bearer $KEY" -H "Connection: close"
