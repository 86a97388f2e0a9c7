#!/usr/bin/env bash
# Fair sharing of Genesys's per-token rate limit: three applications on loopback addresses of
# their own through the proxy to the simulator (limit L = 20 calls per 2-second window per
# token): one sends 10 × L per window, two send 0.2 × L each. For pool sizes 1 and 4 it prints
# what each application got (200s, 429s, the longest wait), how much of the pool's budget was
# served (N × L per window) and how many 429s Genesys itself answered. The test asserts: no
# 429 for the steady applications and their pace kept, the burster served the rest and waiting
# longest, at least 85% of the budget used. Loopback only; stops by itself.
#
#   bash benches/budget-fairness.sh
#   FAIR_SECONDS=60 bash benches/budget-fairness.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export FAIR_SECONDS=${FAIR_SECONDS:-20}
# The queue wait the figures are measured with (the CI-sized test uses a generous 5 s).
export FAIR_MAX_QUEUE_WAIT_MS=${FAIR_MAX_QUEUE_WAIT_MS:-1000}
for pool in 1 4; do
  FAIR_POOL=$pool cargo test --release --test integration a_bursting_application_cannot_starve_steady_ones -- --nocapture 2>&1 |
    grep -E "^fairness|test result|panicked"
done
