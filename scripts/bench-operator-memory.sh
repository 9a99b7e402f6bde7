#!/usr/bin/env bash
# Resident memory of `outbox operator` watching 100 OutboxRelays and 100
# EventConsumers on the local stack (real MongoDB outboxes and a real broker
# behind their status). Prints a table and writes it to
# $CARGO_TARGET_DIR/bench/operator_memory.md.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}
N=${N:-100}
scripts/stack.sh up
# shellcheck disable=SC1091
. "$STATE/env"
# The release build: what the image ships.
BIN=$CARGO_TARGET_DIR/release/outbox
cargo build --quiet --release --bin outbox
NS=opmem-$$
kubectl apply --validate=false -f crds/outbox.dev.yaml >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl -n "$NS" create secret generic mongodb --from-literal=uri="$MONGODB_URI" >/dev/null
kubectl -n "$NS" create configmap session-schemas --from-file=schemas/session/ >/dev/null
# Zero replicas: the stack's node would otherwise try to run 200 pods; the
# operator still builds, applies and probes everything (what is measured).
"$BIN" operator --namespace "$NS" --lease-namespace "$NS" --metrics-listen 127.0.0.1:0 \
  --image outbox-operator:dev --image-pull-policy Never >"$STATE/logs/operator-memory.log" 2>&1 &
OP=$!
cleanup() {
  kill "$OP" 2>/dev/null || true
  kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT
rss() { awk '/VmRSS/ {print $2}' "/proc/$OP/status"; }
sleep 5
idle=$(rss)
"$OUTBOX_PYTHON" - "$N" "$KAFKA_BOOTSTRAP" "$SCHEMA_REGISTRY_URL" >"$STATE/opmem.yaml" <<'PY'
import sys
n, kafka, registry = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(n):
    print(f"""---
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {{name: relay-{i}}}
spec:
  replicas: 0
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: opmem-{i % 10}}}
  kafka: {{bootstrapServers: "{kafka}"}}
  schemaRegistry: {{url: "{registry}"}}
  schemas: {{configMap: session-schemas}}
---
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {{name: consumer-{i}}}
spec:
  topics: [session-events.v1]
  groupId: group-{i}
  replicas: 0
  handler: {{type: log}}
  mongodb: {{uriSecret: {{name: mongodb, key: uri}}, database: opmem-{i % 10}}}
  kafka: {{bootstrapServers: "{kafka}"}}
  schemaRegistry: {{url: "{registry}"}}""")
PY
start=$SECONDS
kubectl -n "$NS" apply -f "$STATE/opmem.yaml" >/dev/null
total=$((2 * N))
while true; do
  done_count=$(kubectl -n "$NS" get orl,ec -o jsonpath='{range .items[*]}{.status.observedGeneration}{"\n"}{end}' | grep -c . || true)
  printf '\r  reconciled %d/%d' "$done_count" "$total" >&2
  [ "$done_count" -ge "$total" ] && break
  [ $((SECONDS - start)) -gt 600 ] && { echo >&2; echo "not all reconciled within 600 s" >&2; exit 1; }
  sleep 2
done
echo >&2
reconciled_in=$((SECONDS - start))
after=$(rss)
sleep 65 # two requeue cycles (30 s each) of status refresh
steady=$(rss)
table="Operator resident memory (release build), $N OutboxRelays + $N EventConsumers (one namespace, real MongoDB and broker behind status)

| moment | VmRSS MiB |
|---|---:|
| idle, no resources | $((idle / 1024)) |
| all $total reconciled (took ${reconciled_in}s) | $((after / 1024)) |
| after two 30 s status requeue cycles | $((steady / 1024)) |
"
echo "$table"
mkdir -p "$CARGO_TARGET_DIR/bench"
echo "$table" >"$CARGO_TARGET_DIR/bench/operator_memory.md"
