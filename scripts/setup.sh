#!/usr/bin/env bash
# Prepare this host for cniflow, idempotently: Debian packages, kernel headers
# for BCC, bpffs, and a virtual environment with the project installed.
# Safe to run again and again; every step checks before it changes anything.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${CNIFLOW_VENV:-$ROOT/.venv}
PKGS=(python3-bpfcc bpfcc-tools libbpfcc linux-headers-amd64 iproute2 iputils-ping iperf3 ethtool
      tshark nfdump pmacct softflowd python3-venv python3-pip python3-numpy prometheus
      curl openssl buildah mmdebstrap uidmap python3-seccomp gcc libc6-dev iptables)

log() { printf 'setup: %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { log "must run as root (BPF, tc and namespaces need it)"; exit 2; }

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build. Kernels without a headers
# package get a link to Debian's nearest headers; the program uses uapi only.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  [ -n "$hdr" ] || { log "no /usr/src/linux-headers-*-amd64 after install"; exit 1; }
  log "linking $KDIR/build -> $hdr, source -> ${common:-$hdr}"
  mkdir -p "$KDIR"
  ln -sfn "$hdr" "$KDIR/build"
  ln -sfn "${common:-$hdr}" "$KDIR/source"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Debian's python3 with system site packages, so `import bcc` works in the venv.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.cniflow-installed"
# again when pyproject.toml or a C source built into the package changed
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] \
   || [ -n "$(find "$ROOT/agent" -name '*.c' -newer "$stamp" -print -quit)" ]; then
  log "installing cniflow into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
  touch "$stamp"
fi
"$VENV/bin/python" -c "import bcc, pyroute2, numpy; from agent.jsonlines import _library; _library()" \
  || { log "venv imports failed"; exit 1; }
log "ready: $VENV/bin/cniflow"
