#!/usr/bin/env bash
# The local demo. Today it brings up the whole local stack and shows each
# service answering; the session API, relay, consumer and operator join it
# as their issues land (see README "Status").
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
STATE=${OUTBOX_STATE:-$REPO/.stack}

scripts/stack.sh up
# shellcheck disable=SC1091
. "$STATE/env"

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
echo "Use it from a shell:  . $STATE/env   (then kubectl, cargo test, ...)"
echo "Stop it:              make stack-down"
echo "The full pipeline (session API -> outbox -> relay -> Kafka -> consumer, run by the operator)"
echo "joins this demo as the relay, consumer and operator issues land."
