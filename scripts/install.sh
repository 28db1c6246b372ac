#!/usr/bin/env bash
# Installs the Oakestra worker (Rust NodeEngine) on a Debian-family machine.
#
#   sudo ./install.sh                 from an unpacked oakestra-worker_<arch>/ folder, or next to
#                                     oakestra-worker_<arch>.tar.gz archives (it picks the one
#                                     matching `dpkg --print-architecture`)
#   sudo ./install.sh <archive|dir>   a given archive, or a folder holding the archives
#
# Installs /usr/local/bin/NodeEngine (+ NetManager link), the systemd units, and the default
# /etc/oakestra/conf.json and /etc/netmanager/netcfg.json only where none exist: a user's
# configuration is never overwritten. Re-running upgrades the binary and keeps the configs.
#
# Environment:
#   DESTDIR   install into this root instead of / (image building, tests). Checks then look
#             inside DESTDIR, and the unit is enabled offline (systemctl --root), not started.
#   OAK_ARCH  architecture to install instead of dpkg's answer (cross-installing into DESTDIR).
# `sh install.sh` would run this under dash: hand over to bash first.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

log() { printf '[install] %s\n' "$*"; }
die() { printf '[install] error: %s\n' "$*" >&2; exit 1; }

SUPPORTED="amd64 arm64 armhf"
DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# --- which architecture ----------------------------------------------------------------------
if [ -n "${OAK_ARCH:-}" ]; then
  arch=$OAK_ARCH
  arch_from="OAK_ARCH"
elif command -v dpkg >/dev/null; then
  arch=$(dpkg --print-architecture)
  arch_from="dpkg --print-architecture"
else
  die "dpkg not found: this installer is for Debian, Raspberry Pi OS and Ubuntu; set OAK_ARCH=amd64|arm64|armhf to force one"
fi
case " $SUPPORTED " in
  *" $arch "*) ;;
  *) die "unsupported architecture '$arch' ($arch_from): oakestra-worker is built for $SUPPORTED (armhf = ARMv7, Raspberry Pi 2 and later)" ;;
esac
# Raspberry Pi OS armhf also runs on ARMv6 boards, where ARMv7 code dies with SIGILL.
if [ "$arch" = armhf ] && [ -z "${OAK_ARCH:-}" ] && [ "$(uname -m)" = armv6l ]; then
  die "this is an ARMv6 CPU (Raspberry Pi 1 / Zero): the armhf build needs ARMv7 or later"
fi

# --- where the files come from ---------------------------------------------------------------
# Either this script sits in an unpacked archive (ARCH + NodeEngine next to it), or it is given
# or sits next to archives, and it unpacks the matching one into a temporary folder.
payload=""
cleanup=""
trap '[ -z "$cleanup" ] || rm -rf "$cleanup"' EXIT

unpack() {
  local archive=$1
  cleanup=$(mktemp -d)
  tar -xzf "$archive" -C "$cleanup" || die "cannot unpack $archive"
  # Whatever arch the archive holds: a mismatch is reported below, by name.
  payload=$(find "$cleanup" -mindepth 2 -maxdepth 2 -name ARCH -printf '%h\n' -quit)
  [ -n "$payload" ] || die "$archive holds no oakestra-worker_<arch>/ folder (not a worker release archive?)"
  log "using $archive"
}

src=${1:-}
if [ -n "$src" ]; then
  if [ -f "$src" ]; then
    unpack "$src"
  elif [ -f "$src/ARCH" ]; then
    payload=$(cd "$src" && pwd)
  elif [ -f "$src/oakestra-worker_$arch.tar.gz" ]; then
    unpack "$src/oakestra-worker_$arch.tar.gz"
  else
    die "$src holds neither an unpacked worker release nor oakestra-worker_$arch.tar.gz"
  fi
elif [ -f "$HERE/ARCH" ] && [ -f "$HERE/NodeEngine" ]; then
  payload=$HERE
else
  for d in "$HERE" "$HERE/dist" "$PWD"; do
    if [ -f "$d/oakestra-worker_$arch.tar.gz" ]; then
      unpack "$d/oakestra-worker_$arch.tar.gz"
      break
    fi
  done
  [ -n "$payload" ] || die "no oakestra-worker_$arch.tar.gz next to this script ($HERE) or in $PWD; download the archive for $arch (or unpack it and run its install.sh)"
fi

payload_arch=$(cat "$payload/ARCH")
[ "$payload_arch" = "$arch" ] ||
  die "this release is for $payload_arch but the machine is $arch ($arch_from): use oakestra-worker_$arch.tar.gz"
for f in NodeEngine nodeengine.service netmanager.service conf.json netcfg.json; do
  [ -f "$payload/$f" ] || die "$payload/$f is missing: the release archive is incomplete, download it again"
done
version=$(cat "$payload/VERSION" 2>/dev/null || echo unknown)

# --- preconditions ---------------------------------------------------------------------------
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0): it writes /usr/local/bin, /etc and the systemd units"
fi

# containerd runs the instances. With DESTDIR the system being prepared is DESTDIR, so that is
# where we look; on a live system, the PATH, a known unit or a live socket also count.
has_containerd() {
  local d
  for d in /usr/local/bin /usr/bin /usr/sbin /bin /sbin /opt/bin; do
    [ -x "$DESTDIR$d/containerd" ] && return 0
  done
  for d in /etc/systemd/system /lib/systemd/system /usr/lib/systemd/system /usr/local/lib/systemd/system; do
    [ -f "$DESTDIR$d/containerd.service" ] && return 0
  done
  if [ -z "$DESTDIR" ]; then
    command -v containerd >/dev/null && return 0
    [ -S "${OAK_CONTAINERD_SOCKET:-/run/containerd/containerd.sock}" ] && return 0
  fi
  return 1
}
has_containerd ||
  die "containerd not found${DESTDIR:+ in $DESTDIR} (no containerd binary, containerd.service unit or socket): install it first with \`apt-get install containerd runc\`, then re-run this script"

systemd_live() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

# --- install ---------------------------------------------------------------------------------
log "installing oakestra-worker $version ($arch) into ${DESTDIR:-/}"
bindir="$DESTDIR/usr/local/bin"
unitdir="$DESTDIR/etc/systemd/system"
install -d -m 0755 "$bindir" "$unitdir" "$DESTDIR/etc/oakestra" "$DESTDIR/etc/netmanager" \
  "$DESTDIR/var/log/oakestra" "$DESTDIR/var/lib/oakestra"

# Copy then rename: replacing a running binary in place fails (ETXTBSY) or corrupts it; a
# rename lets the running process keep the old inode until it restarts.
install -m 0755 "$payload/NodeEngine" "$bindir/.NodeEngine.new"
# On a live system, try the new binary before it replaces a working one (too old a glibc, wrong
# CPU). Run from its final folder: the unpacked archive may sit on a noexec /tmp.
if [ -z "$DESTDIR" ] && ! out=$("$bindir/.NodeEngine.new" version 2>&1); then
  rm -f "$bindir/.NodeEngine.new"
  die "NodeEngine ($arch) does not run on this machine: $out (it needs glibc >= 2.34: Debian / Raspberry Pi OS bookworm or later); the installed NodeEngine, if any, was left in place"
fi
mv -f "$bindir/.NodeEngine.new" "$bindir/NodeEngine"
ln -sfn NodeEngine "$bindir/NetManager"
log "installed $bindir/NodeEngine and $bindir/NetManager -> NodeEngine"

for u in nodeengine.service netmanager.service; do
  install -m 0644 "$payload/$u" "$unitdir/$u"
done
log "installed $unitdir/nodeengine.service and netmanager.service"

install_config() {
  local from=$1 to=$2
  if [ -e "$to" ] || [ -L "$to" ]; then
    log "kept existing $to"
  else
    install -m 0644 "$from" "$to"
    log "wrote default $to"
  fi
}
install_config "$payload/conf.json" "$DESTDIR/etc/oakestra/conf.json"
install_config "$payload/netcfg.json" "$DESTDIR/etc/netmanager/netcfg.json"

# A config the worker cannot read would only show up as a restart loop in the log.
if [ -z "$DESTDIR" ] && ! out=$("$bindir/NodeEngine" config show 2>&1 >/dev/null); then
  log "warning: the existing configuration does not load: $out"
fi

# Upstream's Go worker installed itself in /bin; a leftover would shadow or confuse ours.
for old in /bin/nodeengined /usr/bin/nodeengined; do
  if [ -e "$DESTDIR$old" ]; then
    log "warning: found upstream's Go worker $DESTDIR$old; remove it and its unit if it is still installed"
  fi
done

if systemd_live; then
  systemctl daemon-reload
  systemctl enable nodeengine.service
  # An upgrade takes effect now; a fresh install waits for the cluster address.
  if systemctl is-active --quiet nodeengine.service; then
    systemctl restart nodeengine.service
    log "restarted nodeengine.service on the new binary"
  fi
  log "enabled nodeengine.service"
elif command -v systemctl >/dev/null; then
  # No systemd to talk to (DESTDIR, chroot, container): systemctl can still enable offline,
  # which only writes the [Install] links into the root; it starts nothing.
  root=${DESTDIR:-/}
  out=$(systemctl --root="$root" enable nodeengine.service 2>&1) ||
    die "systemctl --root=$root enable nodeengine.service failed: $out"
  log "enabled nodeengine.service in $root offline (systemd is not running here); it starts at the next boot"
else
  log "systemctl not found; on the target system run: systemctl daemon-reload && systemctl enable nodeengine"
fi

log "done. Next: NodeEngine config cluster <cluster address> && systemctl start nodeengine  (or: NodeEngine -a <cluster address> -d)"
