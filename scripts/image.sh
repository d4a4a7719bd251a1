#!/usr/bin/env bash
# Build the cniflow image from daemonset/Dockerfile with buildah (chroot isolation: no
# daemon, no runc) into an OCI archive, and unpack its root filesystem for the tests.
#
#   sudo scripts/image.sh                      # build (or reuse) and print the archive path
#   sudo scripts/image.sh --push REGISTRY/cniflow:0.1.0   # and push it there
#   sudo scripts/image.sh --print-rootfs       # print the unpacked root filesystem instead
#
# The build is cached by a hash of its inputs (the Dockerfile, pyproject.toml, the
# Python and C sources it copies): a second run with the same inputs does nothing.
# No registry is needed: the Debian base named by the Dockerfile's FROM is made with
# mmdebstrap from the apt mirror this host uses, once, and tagged with that name.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${CNIFLOW_IMAGE_CACHE:-/var/cache/cniflow-image}
BASE=docker.io/library/debian:bookworm-slim
TAG=cniflow:0.1.0
PUSH="" PRINT=archive
while [ $# -gt 0 ]; do
  case $1 in
    --push) PUSH=$2; shift 2 ;;
    --print-rootfs) PRINT=rootfs; shift ;;
    *) echo "usage: $0 [--push REGISTRY/NAME:TAG] [--print-rootfs]" >&2; exit 2 ;;
  esac
done
log() { printf 'image: %s\n' "$*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "must run as root (buildah's chroot isolation)"; exit 2; }
command -v buildah >/dev/null && command -v mmdebstrap >/dev/null \
  || { log "buildah and mmdebstrap missing: run scripts/setup.sh"; exit 2; }

# The build context holds exactly the hashed inputs.
cd "$ROOT"
mapfile -t inputs < <(printf '%s\n' daemonset/Dockerfile pyproject.toml;
  find agent bpf vpp_plugin -type f \( -name '*.py' -o -name '*.c' -o -name '*.csv' \) \
    -not -path '*/__pycache__/*' | LC_ALL=C sort)
hash=$(for f in "${inputs[@]}"; do printf '%s\0' "$f"; sha256sum < "$f"; done \
       | sha256sum | cut -c1-16)
out=$CACHE/$hash
archive=$out/cniflow.oci.tar rootfs=$out/rootfs

if [ ! -f "$out/done" ]; then
  mkdir -p "$CACHE"
  if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
    log "making $BASE with mmdebstrap (minbase, no docs)"
    tarball=$CACHE/base.tar
    mmdebstrap --variant=minbase --mode=root --format=tar \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --aptopt='APT::Install-Recommends "false"' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
      bookworm "$tarball" http://deb.debian.org/debian >&2
    ctr=$(buildah from scratch)
    buildah add --quiet "$ctr" "$tarball" / >/dev/null
    buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --quiet "$ctr" "$BASE" >/dev/null
    buildah rm "$ctr" >/dev/null
    rm -f "$tarball"
  fi
  ctx=$(mktemp -d "$CACHE/context.XXXXXX")
  trap 'rm -rf "$ctx"' EXIT
  for f in "${inputs[@]}"; do install -D -m 0644 "$f" "$ctx/$f"; done
  log "building $TAG (inputs $hash)"
  start=$(date +%s)
  # the host's CA bundle for pip, where PyPI is reached through a TLS-inspecting proxy
  cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  certargs=()
  [ -f "$cert" ] && certargs=(--volume "$cert:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
  buildah build --isolation chroot --pull=never --layers=false "${certargs[@]}" \
    -f "$ctx/daemonset/Dockerfile" -t "localhost/$TAG" "$ctx" >&2
  rm -rf "$out" && mkdir -p "$out"
  buildah push --quiet "localhost/$TAG" "oci-archive:$archive:$TAG" >&2
  ctr=$(buildah from --pull=never "localhost/$TAG")
  mnt=$(buildah mount "$ctr")
  mkdir "$rootfs" && cp -a "$mnt/." "$rootfs/"   # file capabilities (xattrs) kept
  buildah umount "$ctr" >/dev/null && buildah rm "$ctr" >/dev/null
  buildah inspect --type image --format '{{.Docker.Size}}' "localhost/$TAG" > "$out/size" \
    2>/dev/null || true
  du -sb "$rootfs" | cut -f1 > "$out/rootfs-bytes"
  echo "$(( $(date +%s) - start ))" > "$out/build-seconds"
  touch "$out/done"
  # older builds go: one rootfs is enough for the tests
  find "$CACHE" -mindepth 1 -maxdepth 1 -type d -not -name "$hash" -exec rm -rf {} +
  buildah rmi --prune >/dev/null 2>&1 || true   # the images those builds left untagged
  log "built in $(cat "$out/build-seconds") s: $archive ($(du -h "$archive" | cut -f1)," \
      "root filesystem $(( $(cat "$out/rootfs-bytes") / 1048576 )) MiB)"
fi
if [ -n "$PUSH" ]; then
  buildah push "localhost/$TAG" "docker://$PUSH" >&2
fi
[ "$PRINT" = rootfs ] && echo "$rootfs" || echo "$archive"
