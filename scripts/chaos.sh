#!/usr/bin/env bash
# `make chaos`: the chaos suite on the local stack (see scripts/chaos.py):
# CHAOS_EVENTS events (default 100000) through the session API, two relays
# and two consumers, under a seeded schedule of faults (CHAOS_SEED to
# replay a run, CHAOS_FAULTS to choose the kinds, CHAOS_RATE events/s,
# CHAOS_FAULT_EVERY seconds between faults, CHAOS_SHARDS bucket ranges the
# relays share), then the checkers and a
# summary table. Exit status 1 on loss, double effect, order violation or a
# stuck event. Extra arguments go to chaos.py.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}
scripts/stack.sh up mongo kafka registry
# shellcheck disable=SC1091
. "$STATE/env"
echo "[chaos] cargo build --release --bin outbox (target dir $CARGO_TARGET_DIR)"
cargo build --release --bin outbox
RUN_DIR=$STATE/chaos/$(date +%Y%m%d-%H%M%S)
exec "$OUTBOX_PYTHON" -u scripts/chaos.py --bin "$CARGO_TARGET_DIR/release/outbox" --run-dir "$RUN_DIR" \
  --tansu "$OUTBOX_TANSU" "$@"
