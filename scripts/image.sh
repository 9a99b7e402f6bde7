#!/usr/bin/env bash
# Build the project's image, outbox-operator:dev, without any image registry
# (none is reachable here): the release binary built on this machine, the
# shared libraries it links (from `ldd`, nothing else), CA certificates and
# an /etc/passwd with the non-root user 65532, tarred and `docker import`ed
# into the local stack's Docker engine, where the node runs it with
# `imagePullPolicy: Never`. The Dockerfile's multi-stage build is the same
# image for users with a registry.
#
#   scripts/image.sh [IMAGE]     (default outbox-operator:dev; needs `scripts/stack.sh up node`)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${OUTBOX_STATE:-$REPO/.stack}
CACHE=${OUTBOX_CACHE:-/var/cache/outbox-operator}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
IMAGE=${1:-${OUTBOX_IMAGE:-outbox-operator:dev}}
DOCKER=(/usr/bin/docker -H "unix://$STATE/node/docker.sock")
log() { printf '[image] %s\n' "$*" >&2; }

"${DOCKER[@]}" version >/dev/null 2>&1 || { log "the stack's Docker engine is not running: scripts/stack.sh up node"; exit 1; }

log "cargo build --release --bin outbox (target dir $CARGO_TARGET_DIR)"
(cd "$REPO" && cargo build --quiet --release --bin outbox)
BIN=$CARGO_TARGET_DIR/release/outbox
SUM=$(sha256sum "$BIN" | cut -c1-16)
if [ "$("${DOCKER[@]}" image inspect -f '{{index .Config.Labels "dev.outbox.binary"}}' "$IMAGE" 2>/dev/null)" = "$SUM" ]; then
  log "$IMAGE is up to date (binary $SUM)"
  exit 0
fi

ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT/usr/local/bin" "$ROOT/etc/ssl/certs" "$ROOT/tmp"
chmod 1777 "$ROOT/tmp"
cp "$BIN" "$ROOT/usr/local/bin/outbox"
strip "$ROOT/usr/local/bin/outbox"
# Exactly the libraries the binary links, at the paths the loader looks in.
for lib in $(ldd "$BIN" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$ROOT/etc/group"
printf 'hosts: files dns\n' >"$ROOT/etc/nsswitch.conf"

log "docker import -> $IMAGE"
tar --numeric-owner --owner=0 --group=0 -C "$ROOT" -c . | "${DOCKER[@]}" import \
  --change 'USER 65532:65532' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
  --change 'EXPOSE 9090' \
  --change 'ENTRYPOINT ["/usr/local/bin/outbox"]' \
  --change 'CMD ["--help"]' \
  --change "LABEL dev.outbox.binary=$SUM" \
  - "$IMAGE" >/dev/null
"${DOCKER[@]}" image ls "$IMAGE" --format '[image] {{.Repository}}:{{.Tag}} {{.ID}} {{.Size}}' >&2
# The image runs: every subcommand is there.
"${DOCKER[@]}" run --rm --network none --read-only --user 65532:65532 "$IMAGE" --version >&2
