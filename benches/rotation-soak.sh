#!/usr/bin/env bash
# Rotation soak: the rotation-under-load scenario of the test suite, run longer. A real proxy
# process, four clients sending GETs and POSTs with bodies, ROTATIONS (default 100) secret
# rotations alternating SIGHUP and POST /reload with the old secret removed at the simulator
# after each (and every second one followed by a revoke-all of the client's tokens), then a
# wrong secret and a broken config under the same load. Prints requests sent, failed and
# rotations applied. Loopback only; stops by itself.
#
#   bash benches/rotation-soak.sh
#   ROTATIONS=300 ROTATION_PAUSE_MS=50 bash benches/rotation-soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export ROTATIONS=${ROTATIONS:-100}
export ROTATION_PAUSE_MS=${ROTATION_PAUSE_MS:-100}   # traffic between rotations
cargo test --release --test integration secret_rotations_under_load_drop_no_request -- --nocapture 2>&1 |
  grep -E "rotation load:|test result|panicked|failed requests"
