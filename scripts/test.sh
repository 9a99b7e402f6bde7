#!/usr/bin/env bash
# Run every test against the real local stack. Starts what is not running,
# and stops at the end only what this run started (KEEP_STACK=1 keeps all).
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
STATE=${OUTBOX_STATE:-$REPO/.stack}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}


if [ "${KEEP_STACK:-0}" != 1 ] && [ "$(scripts/stack.sh status | grep -c ": stopped" || true)" -gt 0 ]; then
  trap 'scripts/stack.sh down' EXIT
fi
scripts/stack.sh up || { echo "[test] the local stack did not come up; see the messages above" >&2; exit 1; }
# shellcheck disable=SC1091
. "$STATE/env"
# The image the pod tests run on the node (release build, cached).
scripts/image.sh || { echo "[test] the image could not be built; see the messages above" >&2; exit 1; }

echo "[test] cargo test (target dir $CARGO_TARGET_DIR)"
cargo test --no-fail-fast 2>&1
status=$?
echo "[test] cargo test exit status: $status"

# The chaos suite, short: 10k events and a fault every ~6 s, every kind of
# fault (make chaos runs 100k).
echo "[test] chaos suite, short (scripts/chaos.sh, CHAOS_EVENTS=${CHAOS_EVENTS:-10000}, faults ${CHAOS_FAULTS:-all})"
CHAOS_EVENTS=${CHAOS_EVENTS:-10000} CHAOS_FAULT_EVERY=${CHAOS_FAULT_EVERY:-6} \
  scripts/chaos.sh
chaos=$?
echo "[test] chaos suite exit status: $chaos"
[ "$status" -eq 0 ] && status=$chaos
exit $status
