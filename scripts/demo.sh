#!/usr/bin/env bash
# The local demo: bring up the whole local stack, show each service
# answering, then run the session API (the sample bounded context) and drive
# traffic through it, and show what landed in the transactional outbox.
# The relay, consumer and operator join this demo as their issues land.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
SESSIONS=${DEMO_SESSIONS:-200}
API_PORT=${DEMO_API_PORT:-8080}

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
trap 'kill $API_PID 2>/dev/null || true' EXIT
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
echo "Use the stack from a shell:  . $STATE/env"
echo "Stop it:                     make stack-down"
echo "Next in this demo (as their issues land): the relay publishing these rows to Kafka,"
echo "consumers applying them, and the operator running both from OutboxRelay/EventConsumer resources."
