#!/usr/bin/env bash
# The local demo of the whole pipeline, on the project's own stack:
#   stack up -> operator -> OutboxRelay + EventConsumer resources -> the relay
#   and consumer run from the Deployments the operator built (local
#   processes: there is no kubelet here) -> traffic through the session API
#   with a progress bar -> summary table -> kubectl get outboxrelays,eventconsumers
set -euo pipefail
export PYTHONWARNINGS=ignore
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
SESSIONS=${DEMO_SESSIONS:-200}
API_PORT=${DEMO_API_PORT:-8080}
TOPIC=session-events.v1

scripts/stack.sh up
# shellcheck disable=SC1091
. "$STATE/env"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}
cargo build --quiet --bin outbox
OUTBOX_BIN=$CARGO_TARGET_DIR/debug/outbox
K() { kubectl --kubeconfig "$KUBECONFIG" "$@"; }

echo
echo "== the local stack =="
printf '%-16s %-58s %s\n' service endpoint check
mongo_v=$("$OUTBOX_PYTHON" -c "import pymongo,sys; c=pymongo.MongoClient(sys.argv[1]); print('mongod', c.server_info()['version'], 'primary' if c.admin.command('hello')['isWritablePrimary'] else 'NOT primary')" "$MONGODB_URI")
printf '%-16s %-58s %s\n' MongoDB "$MONGODB_URI" "$mongo_v"
kafka_v=$("$OUTBOX_PYTHON" -c "from confluent_kafka.admin import AdminClient; import sys; md=AdminClient({'bootstrap.servers': sys.argv[1]}).list_topics(timeout=10); print(len(md.brokers), 'broker(s),', len(md.topics), 'topic(s)')" "$KAFKA_BOOTSTRAP")
printf '%-16s %-58s %s\n' Kafka "$KAFKA_BOOTSTRAP" "$kafka_v"
printf '%-16s %-58s %s\n' "Schema Registry" "$SCHEMA_REGISTRY_URL" "$(curl -fsS "$SCHEMA_REGISTRY_URL/config")"
kube_v=$(K get --raw /version | "$OUTBOX_PYTHON" -c "import json,sys; print('kube-apiserver', json.load(sys.stdin)['gitVersion'])")
printf '%-16s %-58s %s\n' Kubernetes "$(grep server: "$KUBECONFIG" | awk '{print $2}')" "$kube_v"

RUN=$(date +%s)
NS=outbox-demo-$RUN
DB=demo-$RUN
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

echo
echo "== operator, namespace $NS =="
K apply --validate=false -f crds/outbox.dev.yaml >/dev/null
K create namespace "$NS" >/dev/null
K -n "$NS" create secret generic mongodb --from-literal=uri="$MONGODB_URI" >/dev/null
"$OUTBOX_PYTHON" -c "
from confluent_kafka.admin import AdminClient, NewTopic
import sys
a = AdminClient({'bootstrap.servers': sys.argv[1]})
if sys.argv[2] not in a.list_topics(timeout=10).topics:
    a.create_topics([NewTopic(sys.argv[2], 3, 1)])[sys.argv[2]].result()
" "$KAFKA_BOOTSTRAP" "$TOPIC"
"$OUTBOX_BIN" operator --namespace "$NS" --lease-namespace "$NS" --metrics-listen 127.0.0.1:0 \
  >"$STATE/logs/demo-operator.log" 2>&1 &
PIDS+=($!)
K -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {name: sessions}
spec:
  replicas: 1
  mongodb: {uriSecret: {name: mongodb, key: uri}, database: $DB}
  kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP"}
  schemaRegistry: {url: "$SCHEMA_REGISTRY_URL"}
  routes: [{aggregateType: Session, topic: $TOPIC}]
  pollIntervalMs: 200
---
apiVersion: outbox.dev/v1alpha1
kind: EventConsumer
metadata: {name: readmodel}
spec:
  topics: [$TOPIC]
  groupId: readmodel-$RUN
  handler: {type: projection}
  mongodb: {uriSecret: {name: mongodb, key: uri}, database: $DB}
  kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP"}
  schemaRegistry: {url: "$SCHEMA_REGISTRY_URL"}
EOF
for d in outbox-relay-sessions outbox-consumer-readmodel; do
  for _ in $(seq 1 100); do K -n "$NS" get deployment "$d" >/dev/null 2>&1 && break; sleep 0.3; done
  K -n "$NS" get deployment "$d" >/dev/null || { tail -n 20 "$STATE/logs/demo-operator.log" >&2; exit 1; }
  echo "  the operator built deployment/$d; running it locally with its exact args and environment"
  spec=$("$OUTBOX_PYTHON" scripts/run-from-deployment.py "$KUBECONFIG" "$NS" "$d")
  # Each local "pod" gets its own metrics port (pods have their own network namespaces).
  "$OUTBOX_PYTHON" - "$spec" "$OUTBOX_BIN" "$STATE/logs/demo-$d.log" "$KUBECONFIG" <<'PY' &
import json, os, sys
spec, binary, log, kubeconfig = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
env = dict(os.environ)
env.update(spec["env"])
env.update({"METRICS_LISTEN": "127.0.0.1:0", "KUBECONFIG": kubeconfig, "OUTBOX_LOG_FORMAT": "text"})
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(fd, 1)
os.dup2(fd, 2)
os.execve(binary, [binary] + spec["args"], env)
PY
  PIDS+=($!)
done

echo
echo "== session API: $SESSIONS sessions created, refreshed, half of them ended =="
"$OUTBOX_BIN" session-api --listen "127.0.0.1:$API_PORT" --database "$DB" >"$STATE/logs/demo-session-api.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do curl -fsS -o /dev/null "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null && break; sleep 0.2; done
"$OUTBOX_PYTHON" - "http://127.0.0.1:$API_PORT" "$SESSIONS" <<'PY'
import json, sys, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
def call(method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
start = time.time()
for i in range(n):
    s = call("POST", "/sessions", {"userId": f"user-{i % 20}", "ttlSeconds": 900, "device": "demo"},
             {"idempotency-key": f"demo-{i}", "x-correlation-id": f"demo-corr-{i}"})
    call("POST", f"/sessions/{s['id']}/refresh", {"ttlSeconds": 1800})
    if i % 2 == 0:
        call("DELETE", f"/sessions/{s['id']}?reason=logout")
    done = int(40 * (i + 1) / n)
    sys.stderr.write(f"\r  [{'#' * done}{'.' * (40 - done)}] {i + 1}/{n} sessions")
sys.stderr.write(f"  ({time.time() - start:.1f}s)\n")
PY

echo
echo "== waiting for the relay and the consumer =="
"$OUTBOX_PYTHON" - "$MONGODB_URI" "$DB" "readmodel-$RUN" <<'PY'
import sys, time, pymongo
db, group = pymongo.MongoClient(sys.argv[1])[sys.argv[2]], sys.argv[3]
total, start = db.outbox.count_documents({}), time.time()
while True:
    published = db.outbox.count_documents({"status": "published"})
    consumed = db.processed_events.count_documents({"group": group})
    bar = lambda k: "#" * int(20 * k / total) + "." * (20 - int(20 * k / total))
    sys.stderr.write(f"\r  published [{bar(published)}] {published}/{total}   consumed [{bar(consumed)}] {consumed}/{total}")
    if published == total and consumed == total:
        break
    if time.time() - start > 180:
        sys.stderr.write("\n")
        sys.exit("the pipeline did not finish within 180 s; see .stack/logs/demo-*.log")
    time.sleep(0.3)
sys.stderr.write("\n")
PY

# A reconcile refreshes status now instead of at the next 30 s requeue.
K -n "$NS" annotate outboxrelay/sessions eventconsumer/readmodel outbox.dev/demo-refresh="$(date +%s)" --overwrite >/dev/null
sleep 3

echo
echo "== summary =="
"$OUTBOX_PYTHON" - "$MONGODB_URI" "$DB" "readmodel-$RUN" "$KUBECONFIG" "$NS" <<'PY'
import json, subprocess, sys, pymongo
uri, dbname, group, kubeconfig, ns = sys.argv[1:6]
db = pymongo.MongoClient(uri)[dbname]
rows = {r["_id"]: r for r in db.outbox.find({}, {"occurredOn": 1, "publishedAt": 1, "status": 1})}
processed = {p["eventId"]: p["processedAt"] for p in db.processed_events.find({"group": group})}
def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round((len(values) - 1) * p)))] if values else float("nan")
publish = [(r["publishedAt"] - r["occurredOn"]).total_seconds() * 1000 for r in rows.values() if r.get("publishedAt")]
consume = [(processed[i] - r["occurredOn"]).total_seconds() * 1000 for i, r in rows.items() if i in processed]
status = json.loads(subprocess.run(["kubectl", "--kubeconfig", kubeconfig, "-n", ns, "get", "eventconsumer", "readmodel", "-o", "json"],
                                   check=True, capture_output=True, text=True).stdout).get("status", {})
model = list(db.session_projection.find())
print(f"  {'written (outbox rows)':<34} {len(rows):>8}")
print(f"  {'published to Kafka':<34} {sum(1 for r in rows.values() if r['status'] == 'published'):>8}")
print(f"  {'consumed (projection, exactly once)':<34} {len(processed):>8}")
print(f"  {'consumer lag (operator status)':<34} {status.get('lag', '?'):>8}")
print(f"  {'commit -> published p50 / p99 ms':<34} {pct(publish, .5):>8.0f} / {pct(publish, .99):.0f}")
print(f"  {'commit -> consumed p50 / p99 ms':<34} {pct(consume, .5):>8.0f} / {pct(consume, .99):.0f}")
print(f"  {'read model: users / active sessions':<34} {len(model):>8} / {sum(m.get('activeSessions', 0) for m in model)}")
print("  (latencies include the wait of events written before the relay and consumer were ready)")
PY

echo
echo "== kubectl get outboxrelays,eventconsumers -n $NS =="
K -n "$NS" get outboxrelays,eventconsumers
echo
echo "Logs: $STATE/logs/demo-*.log   Use the stack: . $STATE/env   Stop it: make stack-down"
echo "READY is False with PodsNotReady: this control plane has no kubelet, so the Deployments' pods never start;"
echo "the relay and consumer above ran as local processes from exactly those Deployments."
