# outbox-operator developer entry points. The two a newcomer needs:
#   make demo   set up the local stack and run the demo
#   make test   set up the local stack and run every test against it
OUTBOX_CACHE ?= /var/cache/outbox-operator
export OUTBOX_CACHE
# One target/ directory outside the clone, so fresh clones (CI) build warm.
export CARGO_TARGET_DIR ?= $(OUTBOX_CACHE)/target
STACK := scripts/stack.sh

KIND_CLUSTER ?= outbox
IMAGE ?= outbox-operator:dev
HELM ?= helm

.PHONY: kind-up kind-deploy kind-down
.PHONY: image help build stack-up stack-down stack-status test unit lint fmt demo chaos crds bench-session bench-relay bench-encode bench-consumer bench-webhook bench-operator-memory

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

build: ## build the outbox binary (debug)
	$(STACK) install registry

image: ## build the outbox-operator:dev image into the local node (no registry needed)
	$(STACK) up node && scripts/image.sh

stack-up: ## install (cached) and start MongoDB, Kafka broker, schema registry, control plane and node
	$(STACK) up

stack-down: ## stop what stack-up started
	$(STACK) down

stack-status: ## show which stack processes run
	$(STACK) status

test: ## start the stack, run all tests (unit, integration, end-to-end), stop what it started
	scripts/test.sh

unit: ## unit tests only (no services needed)
	cargo test --lib

lint: ## rustfmt, clippy (warnings are errors), shellcheck on the shell scripts, ruff on the Python
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	$(OUTBOX_CACHE)/venv/bin/shellcheck scripts/*.sh .ci/run
	$(OUTBOX_CACHE)/venv/bin/ruff check --no-cache scripts tests/python

fmt: ## format the code
	cargo fmt --all

demo: ## bring the local stack up and show it working
	scripts/demo.sh

crds: ## regenerate crds/, the chart's CRDs and docs/reference/crd-fields.md from the Rust types
	cargo build --bin outbox
	mkdir -p crds
	$(CARGO_TARGET_DIR)/debug/outbox crds > crds/outbox.dev.yaml
	cp crds/outbox.dev.yaml charts/outbox-operator/crds/outbox.dev.yaml
	mkdir -p docs
	$(CARGO_TARGET_DIR)/debug/outbox crds --reference > docs/reference/crd-fields.md

chaos: ## 100k events through the pipeline under a seeded schedule of faults, then the checkers (CHAOS_EVENTS, CHAOS_SEED)
	scripts/chaos.sh

bench-session: ## benchmark POST /sessions with vs without the outbox write (starts MongoDB)
	$(STACK) up mongo && . $${OUTBOX_STATE:-.stack}/env && cargo bench --bench session_write

bench-relay: ## benchmark the relay on 100k events vs the raw produce ceiling and a naive relay (starts the stack's services)
	$(STACK) up mongo kafka registry && . $${OUTBOX_STATE:-.stack}/env && cargo bench --bench relay_throughput

bench-encode: ## benchmark the relay's CPU per event from row to record, step by step, against apache-avro's encoder (starts the registry)
	$(STACK) up registry && . $${OUTBOX_STATE:-.stack}/env && cargo bench --bench relay_encode

bench-consumer: ## benchmark the projection handler with deduplication vs a no-op handler (starts the stack's services)
	$(STACK) up mongo kafka registry && . $${OUTBOX_STATE:-.stack}/env && cargo bench --bench consumer_throughput

bench-webhook: ## benchmark webhook deliveries (receiver answering at once and after 5 ms) vs the log handler (starts the stack's services)
	$(STACK) up mongo kafka registry && . $${OUTBOX_STATE:-.stack}/env && cargo bench --bench webhook_delivery

bench-operator-memory: ## resident memory of the operator with 100 OutboxRelays and 100 EventConsumers (starts the stack)
	scripts/bench-operator-memory.sh

kind-up: ## create a kind cluster (needs Docker and kind; not on the CI machines)
	kind create cluster --config kind-config.yaml --name $(KIND_CLUSTER)

kind-deploy: ## build the image, load it into kind, install dev MongoDB/Redpanda, the chart and the samples
	docker build -t $(IMAGE) .
	kind load docker-image $(IMAGE) --name $(KIND_CLUSTER)
	kubectl apply -f samples/dev/stack.yaml
	kubectl rollout status statefulset/mongodb --timeout=300s
	kubectl rollout status deployment/redpanda --timeout=300s
	$(HELM) upgrade --install outbox charts/outbox-operator --set image.repository=$(firstword $(subst :, ,$(IMAGE))) \
	  --set image.tag=$(lastword $(subst :, ,$(IMAGE))) --set image.pullPolicy=Never --wait
	kubectl create configmap session-schemas --from-file=schemas/session/ --dry-run=client -o yaml | kubectl apply -f -
	kubectl apply -f samples/session-app.yaml -f samples/outboxrelay.yaml -f samples/eventconsumer-projection.yaml \
	  -f samples/eventconsumer-log.yaml
	kubectl get outboxrelays,eventconsumers

kind-down: ## delete the kind cluster
	kind delete cluster --name $(KIND_CLUSTER)
