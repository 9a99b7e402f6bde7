#!/usr/bin/env bash
# The local demo: bring up the whole local stack, show each service
# answering, run the session API (the sample bounded context) and drive
# traffic through it, show what landed in the transactional outbox, run the
# relay until the outbox is drained, and read the events back from Kafka
# with Confluent's own deserializer. The consumers and the operator join
# this demo as their issues land.
set -euo pipefail
export PYTHONWARNINGS=ignore
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
SESSIONS=${DEMO_SESSIONS:-200}
API_PORT=${DEMO_API_PORT:-8080}
RELAY_METRICS=${DEMO_RELAY_METRICS:-127.0.0.1:9464}
TOPIC=session-events.v1

scripts/stack.sh up
# shellcheck disable=SC1091
. "$STATE/env"
OUTBOX_BIN=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}/debug/outbox

echo
echo "== outbox-operator local stack =="
printf '%-16s %-58s %s\n' service endpoint check
mongo_v=$("$OUTBOX_PYTHON" -c "import pymongo,sys; c=pymongo.MongoClient(sys.argv[1]); print('mongod', c.server_info()['version'], 'primary' if c.admin.command('hello')['isWritablePrimary'] else 'NOT primary')" "$MONGODB_URI")
printf '%-16s %-58s %s\n' MongoDB "$MONGODB_URI" "$mongo_v"
kafka_v=$("$OUTBOX_PYTHON" -c "from confluent_kafka.admin import AdminClient; import sys; md=AdminClient({'bootstrap.servers': sys.argv[1]}).list_topics(timeout=10); print(len(md.brokers), 'broker(s),', len(md.topics), 'topic(s)')" "$KAFKA_BOOTSTRAP")
printf '%-16s %-58s %s\n' Kafka "$KAFKA_BOOTSTRAP" "$kafka_v"
reg_v=$(curl -fsS "$SCHEMA_REGISTRY_URL/config")
printf '%-16s %-58s %s\n' "Schema Registry" "$SCHEMA_REGISTRY_URL" "$reg_v"
kube_v=$(kubectl --kubeconfig "$KUBECONFIG" get --raw /version | "$OUTBOX_PYTHON" -c "import json,sys; print('kube-apiserver', json.load(sys.stdin)['gitVersion'])")
printf '%-16s %-58s %s\n' Kubernetes "$(grep server: "$KUBECONFIG" | awk '{print $2}')" "$kube_v"

echo
echo "== session API: $SESSIONS sessions created, refreshed and ended through http://127.0.0.1:$API_PORT =="
DB="demo-$(date +%s)"
"$OUTBOX_BIN" session-api --listen "127.0.0.1:$API_PORT" --database "$DB" >"$STATE/logs/demo-session-api.log" 2>&1 &
API_PID=$!
RELAY_PID=
trap 'kill $API_PID $RELAY_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 50); do curl -fsS -o /dev/null "http://127.0.0.1:$API_PORT/readyz" 2>/dev/null && break; sleep 0.2; done
curl -fsS -o /dev/null "http://127.0.0.1:$API_PORT/readyz" ||
  { tail -n 20 "$STATE/logs/demo-session-api.log" >&2; echo "session API did not become ready" >&2; exit 1; }

"$OUTBOX_PYTHON" - "http://127.0.0.1:$API_PORT" "$SESSIONS" <<'PY'
import json, sys, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
def call(method, path, body=None, headers=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req) as r:
        return json.load(r)
start, lat = time.time(), []
for i in range(n):
    t = time.time()
    s = call("POST", "/sessions", {"userId": f"user-{i % 20}", "ttlSeconds": 900, "device": "demo"},
             {"idempotency-key": f"demo-{i}", "x-correlation-id": f"demo-corr-{i}"})
    call("POST", f"/sessions/{s['id']}/refresh", {"ttlSeconds": 1800})
    if i % 2 == 0:
        call("DELETE", f"/sessions/{s['id']}?reason=logout")
    lat.append(time.time() - t)
    done = int(40 * (i + 1) / n)
    sys.stderr.write(f"\r  [{'#' * done}{'.' * (40 - done)}] {i + 1}/{n}")
sys.stderr.write("\n")
lat.sort()
print(f"  {n} sessions in {time.time() - start:.1f}s; per session (create+refresh[+end]) p50 {1000*lat[len(lat)//2]:.1f} ms, p99 {1000*lat[int(len(lat)*0.99)-1]:.1f} ms")
PY

echo
echo "== the transactional outbox (database $DB, collection outbox) =="
"$OUTBOX_PYTHON" - "$MONGODB_URI" "$DB" <<'PY'
import sys, pymongo
db = pymongo.MongoClient(sys.argv[1])[sys.argv[2]]
print(f"  {'event':<18} {'status':<10} {'rows':>6}")
for r in db.outbox.aggregate([{"$group": {"_id": {"e": "$eventName", "s": "$status"}, "n": {"$sum": 1}}}, {"$sort": {"_id.e": 1}}]):
    print(f"  {r['_id']['e']:<18} {r['_id']['s']:<10} {r['n']:>6}")
print(f"  sessions: {db.sessions.count_documents({})}, outbox rows: {db.outbox.count_documents({})}")
PY
echo
echo "== relay: outbox -> Kafka topic $TOPIC (Avro via $SCHEMA_REGISTRY_URL) =="
"$OUTBOX_PYTHON" -c "
from confluent_kafka.admin import AdminClient, NewTopic
import sys
a = AdminClient({'bootstrap.servers': sys.argv[1]})
if sys.argv[2] not in a.list_topics(timeout=10).topics:
    a.create_topics([NewTopic(sys.argv[2], 3, 1)])[sys.argv[2]].result()
" "$KAFKA_BOOTSTRAP" "$TOPIC"
"$OUTBOX_BIN" relay --database "$DB" --relay-id demo-relay --metrics-listen "$RELAY_METRICS" \
  >"$STATE/logs/demo-relay.log" 2>&1 &
RELAY_PID=$!
"$OUTBOX_PYTHON" - "$MONGODB_URI" "$DB" "$STATE/logs/demo-relay.log" <<'PY'
import sys, time, pymongo
db = pymongo.MongoClient(sys.argv[1])[sys.argv[2]]
total, start = db.outbox.count_documents({}), time.time()
while True:
    done = db.outbox.count_documents({"status": "published"})
    bar = int(40 * done / total)
    sys.stderr.write(f"\r  [{'#' * bar}{'.' * (40 - bar)}] {done}/{total} published")
    if done == total:
        break
    if time.time() - start > 120:
        sys.stderr.write("\n")
        sys.exit(f"the relay did not drain the outbox within 120 s; see {sys.argv[3]}")
    time.sleep(0.2)
sys.stderr.write("\n")
rows = list(db.outbox.find({"status": "published"}, {"occurredOn": 1, "publishedAt": 1}))
lat = sorted((r["publishedAt"] - r["occurredOn"]).total_seconds() for r in rows)
print(f"  drained in {time.time() - start:.1f}s (the backlog waited for the relay to start; commit-to-publish p50 {lat[len(lat)//2]:.2f}s)")
PY
echo "  relay metrics ($RELAY_METRICS/metrics):"
sleep 5 # the relay refreshes its outbox gauges every 5 s
curl -fsS "http://$RELAY_METRICS/metrics" | grep -E '^outbox_relay_(published_total|pending_events|failed_events|dead_events|leader) ' | sed 's/^/    /'

echo
echo "== read back from Kafka with confluent-kafka's AvroDeserializer =="
"$OUTBOX_PYTHON" - "$KAFKA_BOOTSTRAP" "$SCHEMA_REGISTRY_URL" "$TOPIC" "$DB" "$MONGODB_URI" <<'PY'
import collections, sys, time, pymongo
from confluent_kafka import Consumer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext
bootstrap, registry, topic, dbname, uri = sys.argv[1:6]
ids = {r["_id"] for r in pymongo.MongoClient(uri)[dbname].outbox.find({}, {"_id": 1})}
de = AvroDeserializer(SchemaRegistryClient({"url": registry}))
c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"demo-reader-{time.time()}", "auto.offset.reset": "earliest",
              "session.timeout.ms": 6000})
c.subscribe([topic])
seen, names, sample, deadline = set(), collections.Counter(), None, time.time() + 90
while len(seen) < len(ids) and time.time() < deadline:
    m = c.poll(1.0)
    if m is None or m.error():
        continue
    v = de(m.value(), SerializationContext(topic, MessageField.VALUE))
    if str(v["eventId"]) in ids:
        seen.add(str(v["eventId"]))
        names[v["eventName"]] += 1
        sample = sample or v
c.close()
for n, k in sorted(names.items()):
    print(f"  {n:<18} {k:>6}")
print(f"  this run's events read back: {len(seen)}/{len(ids)}")
print(f"  one of them: {sample['eventName']} v{sample['eventVersion']} key={sample['aggregateId']} "
      f"correlationId={sample['correlationId']} payload={dict(sample['payload'])}")
sys.exit(0 if len(seen) == len(ids) else 1)
PY

echo
echo "Use the stack from a shell:  . $STATE/env"
echo "Stop it:                     make stack-down"
echo "Next in this demo (as their issues land): consumers applying these events, and the operator"
echo "running relays and consumers from OutboxRelay/EventConsumer resources."
