#!/usr/bin/env bash
# Connection flood and slow-header run against a real proxy process, under the open-file limit
# a default systemd service gets (1024). Starts the simulator and the proxy on loopback, then
# opens IDLE (default 1100) connections that send nothing and SLOW (default 100) connections
# that trickle a request head one byte per second, and meanwhile measures:
#   - connections the proxy holds (genesys_proxy_client_connections) over time,
#   - how long the admin listener takes to answer GET /healthz and /metrics,
#   - how long a normal request through the proxy takes (200 once slots are free, or the 503
#     proxy.too_many_connections answer while full).
# Loopback only; bounded in time (about 30 s); stops by itself.
#
#   bash benches/flood.sh                 # release build
#   IDLE=3000 SLOW=500 bash benches/flood.sh
set -euo pipefail
cd "$(dirname "$0")/.."
IDLE=${IDLE:-1100}
SLOW=${SLOW:-100}
cargo build --release --quiet
BIN=$PWD/target/release/genesys-auth-proxy
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM_PORT=$(free_port); PROXY_PORT=$(free_port); ADMIN_PORT=$(free_port)
printf 'flood-secret\n' > "$work/secret"; chmod 600 "$work/secret"
cat > "$work/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[genesys]
login_url = "http://127.0.0.1:$SIM_PORT"
api_url = "http://127.0.0.1:$SIM_PORT"
client_id = "flood"
client_secret = { file = "$work/secret" }
[audit]
path = "$work/audit.jsonl"
[log]
format = "text"
level = "warn"
EOF
"$BIN" sim --listen "127.0.0.1:$SIM_PORT" --client flood:flood-secret --api-rate-limit-per-minute 100000000 >/dev/null 2>&1 &
# The limit a systemd service gets without LimitNOFILE: soft and hard 1024.
( ulimit -Sn 1024; ulimit -Hn 1024; exec "$BIN" run -c "$work/proxy.toml" ) 2> "$work/proxy.log" &
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null && break; sleep 0.1; done
grep -i "max_connections" "$work/proxy.log" || true

python3 - "$PROXY_PORT" "$ADMIN_PORT" "$IDLE" "$SLOW" <<'PY'
import socket, sys, time, threading, urllib.request
proxy, admin, idle_n, slow_n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def timed(url):
    t = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            status = r.status; r.read()
    except urllib.error.HTTPError as e:
        status = e.code
    except Exception as e:
        status = type(e).__name__
    return status, (time.perf_counter() - t) * 1000

def held():
    _, _ = timed(f"http://127.0.0.1:{admin}/healthz")
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("genesys_proxy_client_connections "):
                return int(float(line.split()[1]))
    return -1

socks, refused_at_connect = [], 0
for _ in range(idle_n):
    try:
        s = socket.create_connection(("127.0.0.1", proxy), timeout=2); socks.append(s)
    except OSError:
        refused_at_connect += 1
slow = []
for _ in range(slow_n):
    try:
        s = socket.create_connection(("127.0.0.1", proxy), timeout=2)
        s.sendall(b"GET /api/v2/users HTTP/1.1\r\n"); slow.append(s)
    except OSError:
        refused_at_connect += 1
def trickle():
    for _ in range(25):
        for s in list(slow):
            try: s.send(b"x")
            except OSError: slow.remove(s)
        time.sleep(1)
threading.Thread(target=trickle, daemon=True).start()
print(f"opened {len(socks)} idle + {slow_n} slow-header connections ({refused_at_connect} refused at connect)")
for t in range(0, 25, 3):
    h, hms = timed(f"http://127.0.0.1:{admin}/healthz")
    m, mms = timed(f"http://127.0.0.1:{admin}/metrics")
    p, pms = timed(f"http://127.0.0.1:{proxy}/api/v2/organizations/me")
    print(f"t={t:2d}s held={held():5d} slow-alive={len(slow):4d} admin /healthz {h} {hms:6.1f} ms, /metrics {m} {mms:6.1f} ms; proxy request {p} {pms:6.1f} ms")
    time.sleep(3)
PY
echo "proxy log (warnings/errors):"; grep -ciE "accept failed" "$work/proxy.log" | sed 's/^/  "accept failed" lines: /'
curl -s "http://127.0.0.1:$ADMIN_PORT/metrics" | grep -E 'rejected_requests_total\{reason="(too_many_connections|request_header_timeout)"\}'
