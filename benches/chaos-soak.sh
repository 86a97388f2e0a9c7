#!/usr/bin/env bash
# Chaos soak: the seeded chaos test of the suite, run for 10 minutes (CHAOS_SECONDS). The proxy
# and the simulator run as real processes; four clients send GETs and POSTs with bodies while a
# random schedule drawn from CHAOS_SEED injects secret rotations (file, SIGHUP, POST /reload),
# old-secret removal, revoke-all and revoke-client, every token-endpoint fault kind, latency
# spikes, short token lifetimes, simulator pauses (SIGSTOP) and broken config reloads. Prints
# the seed, requests by status, events, token requests against their bound and the peak RSS;
# fails (printing the seed) on any lost request. Loopback only; stops by itself.
#
#   bash benches/chaos-soak.sh
#   CHAOS_SEED=42 CHAOS_SECONDS=120 bash benches/chaos-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CHAOS_SECONDS=${CHAOS_SECONDS:-600}
cargo test --release --test integration seeded_chaos_soak_loses_no_request -- --nocapture 2>&1 |
  grep -E "chaos soak:|test result|panicked|failed outside|seed"
