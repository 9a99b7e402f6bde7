#!/usr/bin/env bash
# The local demo of the whole pipeline, on the project's own stack:
#   stack up (control plane and node) -> the image, built here -> helm install
#   of the operator -> a session API pod, an OutboxRelay and an EventConsumer,
#   whose relay and consumer pods the operator builds and the node runs ->
#   traffic through the session API with a progress bar -> summary table ->
#   kubectl get outboxrelays,eventconsumers,pods (READY True)
set -euo pipefail
export PYTHONWARNINGS=ignore
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}
SESSIONS=${DEMO_SESSIONS:-200}

scripts/stack.sh up
# shellcheck disable=SC1091
. "$STATE/env"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${OUTBOX_CACHE:-/var/cache/outbox-operator}/target}
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
# A topic of this run's own: a new consumer group reads its topic from the
# start, and must not project an earlier run's events into this run's model.
TOPIC=session-events.demo-$RUN
DB=demo-$RUN

echo
echo "== image and operator (helm install, real pods on the stack's node) =="
scripts/image.sh outbox-operator:dev
# Earlier demo runs' namespaces (their pods would keep running). Their
# custom resources go first, while the operator still watches the newest of
# them and its Role there still exists: deleting a namespace deletes that Role
# too, and an OutboxRelay's finalizer could then never run (see
# docs/guide/operations.md). Older ones, which no operator watches, have
# their finalizer dropped: the namespace's deletion removes the Leases it
# would.
old=$(K get namespaces -l outbox.dev/demo=true -o jsonpath='{.items[*].metadata.name}' 2>/dev/null || true)
for ns in $old; do K -n "$ns" delete outboxrelays,eventconsumers --all --wait=false >/dev/null 2>&1 || true; done
for _ in $(seq 1 60); do
  left=0
  for ns in $old; do left=$((left + $(K -n "$ns" get outboxrelays -o name 2>/dev/null | wc -l))); done
  [ "$left" -eq 0 ] && break
  sleep 0.5
done
for ns in $old; do
  for r in $(K -n "$ns" get outboxrelays -o name 2>/dev/null); do
    K -n "$ns" patch "$r" --type merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
  done
done
K delete namespace -l outbox.dev/demo=true --wait=false >/dev/null 2>&1 || true
K create namespace "$NS" >/dev/null
K label namespace "$NS" outbox.dev/demo=true >/dev/null
# Helm installs a chart's CRDs on the first install only and never upgrades
# them: apply the current ones first, so new status fields are kept.
# (--validate=false: the 1.20 apiserver does not know the CEL rules field.)
K apply --validate=false -f charts/outbox-operator/crds/outbox.dev.yaml >/dev/null
# The operator watches the demo namespace only (a Role there, not a
# ClusterRole), so it never acts on what tests create on the same cluster.
"$OUTBOX_HELM" upgrade --install outbox charts/outbox-operator --namespace outbox-system --create-namespace \
  --set image.repository=outbox-operator --set image.tag=dev --set image.pullPolicy=Never \
  --set watchNamespace="$NS" --set rbac.clusterWide=false \
  --set logFormat=text --wait --timeout 180s >/dev/null
K -n outbox-system rollout status deployment/outbox-outbox-operator --timeout=120s >/dev/null
K -n outbox-system get pods -o wide

echo
echo "== namespace $NS: session API, OutboxRelay (2 replicas sharing 2 bucket ranges), EventConsumer =="
K -n "$NS" create secret generic mongodb --from-literal=uri="$MONGODB_URI" >/dev/null
# The relay's event schemas: one key per event version, named
# <aggregateType>.<eventName>.v<eventVersion>.avsc.
K -n "$NS" create configmap session-schemas --from-file=schemas/session/ >/dev/null
"$OUTBOX_PYTHON" -c "
from confluent_kafka.admin import AdminClient, NewTopic
import sys
a = AdminClient({'bootstrap.servers': sys.argv[1]})
if sys.argv[2] not in a.list_topics(timeout=10).topics:
    a.create_topics([NewTopic(sys.argv[2], 3, 1)])[sys.argv[2]].result()
" "$KAFKA_BOOTSTRAP" "$TOPIC"
K -n "$NS" apply -f - >/dev/null <<EOF
# The sample bounded context: the session API as its own pod.
apiVersion: apps/v1
kind: Deployment
metadata: {name: session-api}
spec:
  replicas: 1
  selector: {matchLabels: {app: session-api}}
  template:
    metadata:
      labels: {app: session-api}
      annotations: {prometheus.io/scrape: "true", prometheus.io/port: "8080"}
    spec:
      automountServiceAccountToken: false
      securityContext: {runAsNonRoot: true, runAsUser: 65532, runAsGroup: 65532}
      containers:
        - name: session-api
          image: outbox-operator:dev
          imagePullPolicy: Never
          args: ["session-api"]
          env:
            - {name: SESSION_API_LISTEN, value: "0.0.0.0:8080"}
            - {name: MONGODB_DATABASE, value: $DB}
            - {name: OUTBOX_LOG_FORMAT, value: json}
            - name: MONGODB_URI
              valueFrom: {secretKeyRef: {name: mongodb, key: uri}}
          ports: [{name: http, containerPort: 8080, protocol: TCP}]
          readinessProbe: {httpGet: {path: /readyz, port: http}, periodSeconds: 2}
          livenessProbe: {httpGet: {path: /healthz, port: http}}
          securityContext: {readOnlyRootFilesystem: true, allowPrivilegeEscalation: false, capabilities: {drop: ["ALL"]}}
---
apiVersion: outbox.dev/v1alpha1
kind: OutboxRelay
metadata: {name: sessions}
spec:
  replicas: 2
  shards: 2
  mongodb: {uriSecret: {name: mongodb, key: uri}, database: $DB}
  kafka: {bootstrapServers: "$KAFKA_BOOTSTRAP"}
  schemaRegistry: {url: "$SCHEMA_REGISTRY_URL"}
  schemas: {configMap: session-schemas}
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
K -n "$NS" rollout status deployment/session-api --timeout=120s >/dev/null
for d in outbox-relay-sessions outbox-consumer-readmodel; do
  for _ in $(seq 1 100); do K -n "$NS" get deployment "$d" >/dev/null 2>&1 && break; sleep 0.3; done
  K -n "$NS" rollout status "deployment/$d" --timeout=120s >/dev/null ||
    { K -n "$NS" describe pods >&2; exit 1; }
done
K -n "$NS" get pods -o wide
API_IP=$(K -n "$NS" get pods -l app=session-api -o jsonpath='{.items[0].status.podIP}')

echo
echo "== session API pod ($API_IP): $SESSIONS sessions created, refreshed, half of them ended =="
"$OUTBOX_PYTHON" scripts/lib/demo.py drive "http://$API_IP:8080" "$SESSIONS"

echo
echo "== waiting for the relay and the consumer =="
"$OUTBOX_PYTHON" scripts/lib/demo.py wait "$MONGODB_URI" "$DB" "readmodel-$RUN"

# A reconcile refreshes status now instead of at the next 30 s requeue.
K -n "$NS" annotate outboxrelay/sessions eventconsumer/readmodel outbox.dev/demo-refresh="$(date +%s)" --overwrite >/dev/null
# Wait (up to 30 s) for status to show both Ready, nothing pending and no lag (the
# consumer commits its offsets every second); stale figures fail the demo.
relay_now() { K -n "$NS" get outboxrelay sessions -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.status.pending}'; }
consumer_now() { K -n "$NS" get eventconsumer readmodel -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.status.lag}'; }
for i in $(seq 1 31); do
  [ "$(relay_now)" = True/0 ] && [ "$(consumer_now)" = True/0 ] && break
  if [ "$i" = 31 ]; then
    echo "status did not catch up within 30 s: OutboxRelay sessions Ready/pending $(relay_now)," \
      "EventConsumer readmodel Ready/lag $(consumer_now) (want True/0 for both)" >&2
    exit 1
  fi
  sleep 1
  K -n "$NS" annotate outboxrelay/sessions eventconsumer/readmodel outbox.dev/demo-refresh="$(date +%s%N)" --overwrite >/dev/null
done

echo
echo "== summary =="
# Every relay pod that publishes a range (the status names them).
relay_ips=$(K -n "$NS" get pods -l app.kubernetes.io/name=outbox-relay -o json |
  "$OUTBOX_PYTHON" -c 'import json,sys; h=sys.argv[1].split(","); print(",".join(p["status"].get("podIP","") for p in json.load(sys.stdin)["items"] if p["metadata"]["name"] in h))' \
  "$(K -n "$NS" get outboxrelay sessions -o jsonpath='{.status.activeRelay}')")
"$OUTBOX_PYTHON" scripts/lib/demo.py summary "$MONGODB_URI" "$DB" "readmodel-$RUN" "$KUBECONFIG" "$NS" "$relay_ips"

echo
echo "== from Prometheus ($PROMETHEUS_URL, scraping every pod of the stack every 2 s) =="
"$OUTBOX_PYTHON" scripts/lib/demo.py prometheus "$PROMETHEUS_URL" "$NS"

echo
echo "== kubectl get outboxrelays,eventconsumers,pods -n $NS =="
K -n "$NS" get outboxrelays,eventconsumers
echo
K -n "$NS" get pods
echo
echo "Bucket ranges and the relay pod publishing each (holder of the range's Lease):"
K -n "$NS" get outboxrelay sessions -o jsonpath='{range .status.ranges[*]}  {.range}: {.owner}{"\n"}{end}'
echo
# The same binary is the kubectl plugin (kubectl-outbox on the PATH).
mkdir -p "$STATE/bin"
ln -sf "$CARGO_TARGET_DIR/release/outbox" "$STATE/bin/kubectl-outbox"
echo "== kubectl outbox status sessions -n $NS =="
PATH="$STATE/bin:$PATH" kubectl outbox status sessions -n "$NS"
echo
echo "== kubectl outbox status consumer/readmodel -n $NS =="
PATH="$STATE/bin:$PATH" kubectl outbox status consumer/readmodel -n "$NS"
echo
echo "Logs: kubectl -n $NS logs -l app.kubernetes.io/name=outbox-relay"
echo "Use the stack: . $STATE/env   Stop it: make stack-down"
