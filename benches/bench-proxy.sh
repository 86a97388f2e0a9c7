# Sourced by the bench scripts: a free loopback port, and the proxy config every load bench uses
# (the simulator's "bench" client, warn-level logs).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# write_bench_proxy_toml FILE PROXY_PORT ADMIN_PORT SIM_PORT SECRET_FILE AUDIT_FILE
write_bench_proxy_toml() {
  cat >"$1" <<TOML
[proxy]
listen = "127.0.0.1:$2"
[admin]
listen = "127.0.0.1:$3"
[genesys]
login_url = "http://127.0.0.1:$4"
api_url = "http://127.0.0.1:$4"
client_id = "bench"
client_secret = { file = "$5" }
[audit]
path = "$6"
[log]
level = "warn"
TOML
}

# start_sim BIN [sim flags…]: the simulator on a port-0 listener in the background, its pid
# appended to PIDS (the caller's cleanup stops it), its log in $WORK/sim.out; sets SIM to its
# URL once it prints it.
start_sim() {
  local bin=$1
  shift
  "$bin" sim --listen 127.0.0.1:0 "$@" >"$WORK/sim.out" 2>/dev/null &
  PIDS+=($!)
  for _ in $(seq 100); do grep -q http "$WORK/sim.out" 2>/dev/null && break; sleep 0.05; done
  SIM=$(grep -o 'http://[0-9.:]*' "$WORK/sim.out" | head -1)
}
