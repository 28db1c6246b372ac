#!/usr/bin/env bash
# install.sh as a real, live install (no DESTDIR) into a minimal network-less chroot: the
# host's own bash, coreutils, tar, dpkg and containerd binaries copied in with their libraries.
# Covers what the DESTDIR runs cannot: the PATH lookup of containerd, the "does the installed
# binary run here" and "does the config load" checks, the no-systemd paths (without and with
# systemctl), the worker's real default paths (/etc/oakestra), and uninstall on a live root.
#
#   tests/release/chroot-test.sh <dist folder>        (root; needs unshare and chroot)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T_NAME=chroot
# shellcheck source=tests/release/lib.sh
. "$HERE/lib.sh"

DIST=$(cd "${1:?usage: chroot-test.sh <dist folder>}" && pwd)
ARCH=$(dpkg --print-architecture)
[ "$(id -u)" = 0 ] || fail "needs root (chroot)"
[ -f "$DIST/oakestra-worker_$ARCH.tar.gz" ] || fail "$DIST/oakestra-worker_$ARCH.tar.gz missing: run scripts/build-release.sh first"

WORK=$(mktemp -d /tmp/oak-chroot-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
ROOT="$WORK/root"

# Every program install.sh, uninstall.sh and this test call inside the chroot.
TOOLS=(bash sh env id dirname cat mktemp tar gzip install mv ln rm uname dpkg readlink sed
  mkdir ls cmp grep stat find)
copy_libs() {
  local lib
  for lib in $(ldd "$1" 2>/dev/null | grep -o '/[^ ]*'); do
    [ -e "$ROOT$lib" ] && continue
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
  done
}
copy_with_libs() {
  mkdir -p "$ROOT$(dirname "$1")"
  cp -L "$1" "$ROOT$1"
  copy_libs "$1"
}
mkdir -p "$ROOT"/{bin,usr/bin,tmp,etc,opt,dev,run}
chmod 1777 "$ROOT/tmp"
for t in "${TOOLS[@]}"; do
  p=$(command -v "$t") || fail "$t not found on the host"
  copy_with_libs "$(readlink -f "$p")"
  # Reachable under the usual names whatever the host's /usr merge looks like.
  [ -e "$ROOT/usr/bin/$t" ] || ln -s "$(readlink -f "$p")" "$ROOT/usr/bin/$t"
  [ -e "$ROOT/bin/$t" ] || ln -s "/usr/bin/$t" "$ROOT/bin/$t"
done
# NodeEngine's own libraries (libgcc_s besides libc): what any Debian system has.
mkdir -p "$WORK/pkg"
tar -xzf "$DIST/oakestra-worker_$ARCH.tar.gz" -C "$WORK/pkg"
copy_libs "$WORK/pkg/oakestra-worker_$ARCH/NodeEngine"
echo "root:x:0:0:root:/root:/bin/bash" >"$ROOT/etc/passwd"
mkdir -p "$ROOT/opt/dist"
cp "$DIST/oakestra-worker_$ARCH.tar.gz" "$DIST/install.sh" "$DIST/uninstall.sh" "$ROOT/opt/dist/"

# No network at all in there: the installer must not need any.
in_root() { unshare --net chroot "$ROOT" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root "$@"; }
equal "unshare --net leaves only the loopback interface" lo \
  "$(unshare --net cat /proc/net/dev | awk -F: 'NR > 2 { gsub(/ /, "", $1); print $1 }')"
run_ok "the chroot works and has no systemd" in_root /bin/bash -c "test ! -e /run/systemd/system"

section "live install without containerd"
run_fails "refused, naming the fix" "apt-get install containerd runc" in_root /opt/dist/install.sh
contains "says nothing was found" "containerd not found (no containerd binary" "$OUT"

section "live install with containerd on the PATH"
# The real binary, hard-linked (same filesystem) or copied.
ln "$(readlink -f "$(command -v containerd)")" "$ROOT/usr/bin/containerd" 2>/dev/null ||
  cp "$(readlink -f "$(command -v containerd)")" "$ROOT/usr/bin/containerd"
run_ok "dist/install.sh in the chroot" in_root /opt/dist/install.sh
contains "picked the archive" "using /opt/dist/oakestra-worker_$ARCH.tar.gz" "$OUT"
contains "no systemctl: says what to run" "systemctl not found; on the target system run: systemctl daemon-reload && systemctl enable nodeengine" "$OUT"
if grep -q "warning" <<<"$OUT"; then fail "unexpected warning from a clean install: $OUT"; fi
ok "no warnings on a clean install"
run_ok "NodeEngine on the PATH in the chroot" in_root NodeEngine version
run_ok "config cluster writes /etc/oakestra/conf.json" in_root NodeEngine config cluster 198.51.100.4 -p 10111
run_ok "config show" in_root NodeEngine config show
equal "cluster address from /etc/oakestra/conf.json" 198.51.100.4 "$(jq -r .cluster_address <<<"$OUT")"
equal "netcfg from /etc/netmanager/netcfg.json" /etc/netmanager/netcfg.json "$(jq -r .netcfg <<<"$OUT")"
cp "$ROOT/etc/oakestra/conf.json" "$WORK/user-conf.json"

section "upgrade in place, now with systemctl (but no systemd running)"
copy_with_libs "$(readlink -f "$(command -v systemctl)")"
[ -e "$ROOT/usr/bin/systemctl" ] || ln -s "$(readlink -f "$(command -v systemctl)")" "$ROOT/usr/bin/systemctl"
run_ok "install.sh again" in_root /opt/dist/install.sh
contains "enables the unit offline" "enabled nodeengine.service in / offline" "$OUT"
equal "nodeengine.service wanted by multi-user.target" /etc/systemd/system/nodeengine.service \
  "$(readlink "$ROOT/etc/systemd/system/multi-user.target.wants/nodeengine.service")"
same_file "user's conf.json kept" "$WORK/user-conf.json" "$ROOT/etc/oakestra/conf.json"
echo '{"cluster_address": ' >"$ROOT/etc/oakestra/conf.json" # a user's broken edit
run_ok "install.sh with a broken conf.json still installs" in_root /opt/dist/install.sh
contains "and warns that it does not load" "warning: the existing configuration does not load" "$OUT"
equal "and leaves it for the user to fix" '{"cluster_address": ' "$(cat "$ROOT/etc/oakestra/conf.json")"

# A binary that cannot run here (as with too old a glibc) must not replace a working one.
gcc_s=$(find "$ROOT" -name libgcc_s.so.1 -print -quit)
[ -n "$gcc_s" ] || fail "libgcc_s.so.1 not found in the chroot"
mv "$gcc_s" "$WORK/libgcc_s.so.1"
printf 'previous release\n' >"$ROOT/usr/local/bin/NodeEngine"
cp "$ROOT/usr/local/bin/NodeEngine" "$WORK/previous"
run_fails "a binary that does not run here is refused" "does not run on this machine" in_root /opt/dist/install.sh
contains "the refusal names the glibc floor" "glibc >= 2.34" "$OUT"
same_file "the previous NodeEngine stays in place" "$WORK/previous" "$ROOT/usr/local/bin/NodeEngine"
absent "$ROOT/usr/local/bin/.NodeEngine.new"
mv "$WORK/libgcc_s.so.1" "$gcc_s"
run_ok "install.sh once the system is fixed" in_root /opt/dist/install.sh
same_file "the new NodeEngine is in place" "$WORK/pkg/oakestra-worker_$ARCH/NodeEngine" "$ROOT/usr/local/bin/NodeEngine"

section "uninstall on a live root"
run_ok "uninstall.sh" in_root /opt/dist/uninstall.sh
absent "$ROOT/usr/local/bin/NodeEngine"
absent "$ROOT/usr/local/bin/NetManager"
absent "$ROOT/etc/systemd/system/nodeengine.service"
absent "$ROOT/etc/systemd/system/multi-user.target.wants/nodeengine.service"
[ -f "$ROOT/etc/oakestra/conf.json" ] || fail "uninstall removed conf.json without --purge"
ok "configs kept"
[ -x "$ROOT/usr/bin/containerd" ] || fail "uninstall touched containerd"
run_ok "uninstall.sh --purge" in_root /opt/dist/uninstall.sh --purge
absent "$ROOT/etc/oakestra"

printf '[%s] PASS (%d checks)\n' "$T_NAME" "$T_CHECKS"
