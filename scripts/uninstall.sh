#!/usr/bin/env bash
# Removes the Oakestra worker installed by install.sh: stops and disables the units, removes the
# binaries and the units. Configuration, state and logs stay unless --purge is given.
# Instances already running in containerd (namespace "oakestra") are left alone.
#
#   sudo ./uninstall.sh [--purge]
#
# DESTDIR: remove from this root instead of / (systemctl is then not run).
# `sh uninstall.sh` would run this under dash: hand over to bash first.
if [ -z "${BASH_VERSION:-}" ]; then exec bash "$0" "$@"; fi
set -euo pipefail

log() { printf '[uninstall] %s\n' "$*"; }
die() { printf '[uninstall] error: %s\n' "$*" >&2; exit 1; }

purge=false
for a in "$@"; do
  case $a in
    --purge) purge=true ;;
    -h | --help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument '$a' (usage: uninstall.sh [--purge])" ;;
  esac
done

DESTDIR=${DESTDIR:-}
DESTDIR=${DESTDIR%/}
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
  die "run as root (sudo $0)"
fi

bindir="$DESTDIR/usr/local/bin"
unitdir="$DESTDIR/etc/systemd/system"
units=(nodeengine.service netmanager.service)

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  # disable --now: stop and remove the wants/ links in one go; a unit that is not loaded is fine.
  systemctl disable --now "${units[@]}" 2>/dev/null || true
  log "stopped and disabled ${units[*]}"
elif [ -z "$DESTDIR" ] && [ -x "$bindir/NodeEngine" ]; then
  # Without systemd, `NodeEngine -d` runs the worker under a pid file; stop that one.
  "$bindir/NodeEngine" stop >/dev/null 2>&1 || true
fi

# Links `systemctl enable` made, for the DESTDIR case where systemctl was never run here.
for u in "${units[@]}"; do
  rm -f "$unitdir/$u" "$unitdir/multi-user.target.wants/$u"
done
if [ -L "$bindir/NetManager" ] && [ "$(readlink "$bindir/NetManager")" = NodeEngine ]; then
  rm -f "$bindir/NetManager"
fi
rm -f "$bindir/NodeEngine" "$bindir/.NodeEngine.new"
log "removed $bindir/NodeEngine, NetManager and the units from $unitdir"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

if $purge; then
  rm -rf "$DESTDIR/etc/oakestra" "$DESTDIR/etc/netmanager" "$DESTDIR/var/lib/oakestra" \
    "$DESTDIR/var/log/oakestra"
  log "purged /etc/oakestra, /etc/netmanager, /var/lib/oakestra and /var/log/oakestra"
else
  log "kept /etc/oakestra, /etc/netmanager, /var/lib/oakestra and /var/log/oakestra (--purge removes them)"
fi
