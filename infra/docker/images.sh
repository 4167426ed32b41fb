#!/usr/bin/env bash
# Build the app and worker images from infra/docker/Dockerfile.{app,worker} with podman, on a Debian
# bookworm base bootstrapped here with mmdebstrap (no image registry needed), and print their sizes.
#
#   infra/docker/images.sh            # base (cached) + both images
#   infra/docker/images.sh base|app|worker
#
# Environment: IMAGES_DIR (podman storage, config and the cached base; default /var/tmp/birefnet-images),
# IMAGE_TAG (default 0.1.0), BASE_IMAGE (skip the bootstrap and build on this image instead),
# WHEELS_DIR (optional: a directory of wheel files bind-mounted read-only and given to pip as
# --find-links, e.g. a host's wheel cache; the lock's hashes still decide what is installed).
# TMPDIR: where podman stages layer copies (the worker layer is ~6 GB, twice); default /var/tmp.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IMAGES_DIR=${IMAGES_DIR:-/var/tmp/birefnet-images}
IMAGE_TAG=${IMAGE_TAG:-0.1.0}
LOCAL_BASE=localhost/birefnet-base:bookworm
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
mkdir -p "$IMAGES_DIR"

# podman on these hosts: runc (crun cannot run on hybrid cgroups), limits root may set, storage kept
# under IMAGES_DIR so that the whole thing goes away with `rm -rf $IMAGES_DIR`.
cat > "$IMAGES_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
cat > "$IMAGES_DIR/storage.conf" <<CONF
[storage]
driver = "overlay"
runroot = "$IMAGES_DIR/run"
graphroot = "$IMAGES_DIR/storage"
CONF
export CONTAINERS_CONF="$IMAGES_DIR/containers.conf" CONTAINERS_STORAGE_CONF="$IMAGES_DIR/storage.conf"

ensure_tools() {
    if command -v podman >/dev/null && command -v mmdebstrap >/dev/null && command -v runc >/dev/null; then
        return
    fi
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah mmdebstrap runc uidmap fuse-overlayfs >/dev/null
    else
        echo "images: podman, runc and mmdebstrap are needed (Debian: apt-get install podman mmdebstrap runc)" >&2
        exit 1
    fi
}

# A minimal bookworm with Python 3.11 (Debian's), the host's CA bundle (outgoing HTTPS may pass through a
# proxy whose CA only the host trusts) and PIP_CERT pointing pip at it. Cached as a tar and an image.
build_base() {
    [ "$BASE_IMAGE" = "$LOCAL_BASE" ] || return 0
    if podman image exists "$LOCAL_BASE"; then return 0; fi
    local tar="$IMAGES_DIR/bookworm-python.tar"
    if [ ! -f "$tar" ]; then
        local start=$SECONDS
        mmdebstrap --mode=root --variant=minbase --format=tar --include=python3,python3-venv,ca-certificates \
            --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
            bookworm "$tar.tmp"
        mv "$tar.tmp" "$tar"
        echo "images: base rootfs in $((SECONDS - start)) s"
    fi
    podman import --change 'CMD ["/bin/bash"]' --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        "$tar" "$LOCAL_BASE" >/dev/null
}

build_image() {  # $1: app | worker
    local name=$1 start=$SECONDS extra=()
    if [ ! -f "$ROOT/requirements/$name.txt" ]; then
        echo "images: $ROOT/requirements/$name.txt is missing (the lock)" >&2
        exit 1
    fi
    if [ -n "${WHEELS_DIR:-}" ]; then
        printf '[global]\nfind-links = /wheels\n' > "$IMAGES_DIR/pip-wheels.conf"
        extra+=(--volume "$WHEELS_DIR:/wheels:ro" --volume "$IMAGES_DIR/pip-wheels.conf:/etc/pip.conf:ro")
    fi
    # docker format: OCI image configs have no HEALTHCHECK, which the worker image uses.
    podman build --layers --format docker --file "$ROOT/infra/docker/Dockerfile.$name" --build-arg "BASE_IMAGE=$BASE_IMAGE" \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        "${extra[@]}" --tag "localhost/birefnet-$name:$IMAGE_TAG" "$ROOT"
    echo "images: birefnet-$name built in $((SECONDS - start)) s"
}

sizes() {
    podman images --filter reference='localhost/birefnet-*' --format '{{.Repository}}:{{.Tag}} {{.Size}}'
}

ensure_tools
case "${1:-all}" in
    base) build_base ;;
    app) build_base; build_image app ;;
    worker) build_base; build_image worker ;;
    all) build_base; build_image app; build_image worker ;;
    sizes) ;;
    *) echo "usage: $0 [base|app|worker|all|sizes]" >&2; exit 2 ;;
esac
sizes
