#!/usr/bin/env bash
# install.sh and uninstall.sh for real, into scratch roots (DESTDIR) on this machine: files,
# modes, the NetManager link, the units, configs never overwritten, upgrades, archive picking by
# architecture, the error paths (unsupported architecture, wrong archive, no containerd, not
# root), and removal.
#
#   tests/release/install-test.sh <dist folder>      (after scripts/build-release.sh)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
T_NAME=install
# shellcheck source=tests/release/lib.sh
. "$HERE/lib.sh"

DIST=$(cd "${1:?usage: install-test.sh <dist folder>}" && pwd)
ARCH=$(dpkg --print-architecture)
[ -f "$DIST/oakestra-worker_$ARCH.tar.gz" ] || fail "$DIST/oakestra-worker_$ARCH.tar.gz missing: run scripts/build-release.sh first"

WORK=$(mktemp -d /tmp/oak-install-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
chmod 0755 "$WORK" # the not-root check below runs as nobody
tar -xzf "$DIST/oakestra-worker_$ARCH.tar.gz" -C "$WORK"
PKG="$WORK/oakestra-worker_$ARCH"

# A scratch root with containerd installed the way Debian's package does it: its real unit file.
[ -f /lib/systemd/system/containerd.service ] ||
  fail "/lib/systemd/system/containerd.service missing: apt-get install containerd (scripts/setup-deps.sh)"
new_root() {
  local r="$WORK/$1"
  mkdir -p "$r/lib/systemd/system"
  cp /lib/systemd/system/containerd.service "$r/lib/systemd/system/"
  echo "$r"
}

section "refusals"
EMPTY="$WORK/empty"
mkdir -p "$EMPTY"
run_fails "no containerd in DESTDIR is refused, naming the fix" "apt-get install containerd runc" \
  env DESTDIR="$EMPTY" "$PKG/install.sh"
contains "no containerd: says what is missing" "containerd not found in $EMPTY" "$OUT"
absent "$EMPTY/usr/local/bin/NodeEngine"
R=$(new_root unsupported)
run_fails "unsupported architecture is refused" "unsupported architecture 'mips'" \
  env DESTDIR="$R" OAK_ARCH=mips "$PKG/install.sh"
contains "unsupported architecture: lists the supported ones" "amd64 arm64 armhf" "$OUT"
other=arm64
[ "$ARCH" != arm64 ] || other=amd64
run_fails "an archive for another architecture is refused" "this release is for $ARCH but the machine is $other" \
  env DESTDIR="$R" OAK_ARCH=$other "$PKG/install.sh"
absent "$R/usr/local/bin/NodeEngine"
run_fails "a live install needs root" "run as root" \
  setpriv --reuid=65534 --regid=65534 --clear-groups env -u DESTDIR "$PKG/install.sh"

section "fresh install from the unpacked archive"
R=$(new_root fresh)
run_ok "install.sh into DESTDIR" env DESTDIR="$R" "$PKG/install.sh"
contains "enables the unit offline" "enabled nodeengine.service in $R offline" "$OUT"
equal "nodeengine.service wanted by multi-user.target" /etc/systemd/system/nodeengine.service \
  "$(readlink "$R/etc/systemd/system/multi-user.target.wants/nodeengine.service")"
equal "systemctl sees nodeengine enabled, netmanager not" "enabled disabled" \
  "$(systemctl --root="$R" is-enabled nodeengine.service netmanager.service | tr '\n' ' ' | sed 's/ $//')"
contains "writes the default conf.json" "wrote default $R/etc/oakestra/conf.json" "$OUT"
B="$R/usr/local/bin"
mode "$B/NodeEngine" 755
same_file "installed binary is the archive's" "$PKG/NodeEngine" "$B/NodeEngine"
[ -L "$B/NetManager" ] || fail "$B/NetManager is not a symlink"
equal "NetManager links to NodeEngine (relative, works in any root)" NodeEngine "$(readlink "$B/NetManager")"
absent "$B/.NodeEngine.new"
for u in nodeengine.service netmanager.service; do
  mode "$R/etc/systemd/system/$u" 644
  same_file "$u is the repository's" "$REPO/scripts/systemd/$u" "$R/etc/systemd/system/$u"
done
mode "$R/etc/oakestra/conf.json" 644
mode "$R/etc/netmanager/netcfg.json" 644
same_file "default conf.json" "$PKG/conf.json" "$R/etc/oakestra/conf.json"
same_file "default netcfg.json" "$REPO/cross/netcfg.json" "$R/etc/netmanager/netcfg.json"
for d in var/log/oakestra var/lib/oakestra etc/oakestra etc/netmanager; do
  [ -d "$R/$d" ] || fail "$R/$d was not created"
  mode "$R/$d" 755
done

unit=$(cat "$R/etc/systemd/system/nodeengine.service")
for line in "ExecStart=/usr/local/bin/NodeEngine" "Restart=always" "RestartSec=5" \
  "After=network-online.target containerd.service" "Wants=network-online.target containerd.service" \
  "StandardOutput=append:/var/log/oakestra/nodeengine.log" \
  "StandardError=append:/var/log/oakestra/nodeengine.log" "WantedBy=multi-user.target"; do
  grep -qxF "$line" <<<"$unit" || fail "nodeengine.service lacks the line $line"
done
ok "nodeengine.service: foreground ExecStart, restart policy, ordering, upstream log file"
unit=$(cat "$R/etc/systemd/system/netmanager.service")
for line in "ExecStart=/usr/local/bin/NetManager" "Restart=always" \
  "StandardOutput=append:/var/log/oakestra/netmanager.log"; do
  grep -qxF "$line" <<<"$unit" || fail "netmanager.service lacks the line $line"
done
ok "netmanager.service: runs the NetManager personality"

if command -v systemd-analyze >/dev/null; then
  # verify --root needs the stock units (sysinit.target...); it only warns on bad keys, so any
  # output at all is a failure.
  cp -a /lib/systemd/system/. "$R/lib/systemd/system/"
  out=$(systemd-analyze verify --man=no --root="$R" /etc/systemd/system/nodeengine.service \
    /etc/systemd/system/netmanager.service 2>&1) || fail "systemd-analyze verify failed: $out"
  [ -z "$out" ] || fail "systemd-analyze verify complains: $out"
  ok "systemd-analyze verify: both units are clean"
else
  section "SKIP systemd-analyze verify (systemd-analyze not installed)"
fi

run_ok "installed NodeEngine runs" "$B/NodeEngine" version
contains "installed NodeEngine reports its version" "NodeEngine $(cut -d' ' -f1 "$PKG/VERSION")" "$OUT"
run_fails "installed NetManager link has the NetManager personality" "NetManager takes no arguments" \
  "$B/NetManager" --bogus
run_ok "installed binary reads the installed configs" \
  env OAK_CONFIG_DIR="$R/etc/oakestra" OAK_NETCFG="$R/etc/netmanager/netcfg.json" "$B/NodeEngine" config show
equal "config show: default cluster address" 0.0.0.0 "$(jq -r .cluster_address <<<"$OUT")"
equal "config show: tunnel port from netcfg.json" 50103 "$(jq -r .tunnel_port <<<"$OUT")"

section "re-install: upgrade the binary, keep the user's configs"
OAK_CONFIG_DIR="$R/etc/oakestra" "$B/NodeEngine" config cluster 192.0.2.7 -p 10200 >/dev/null
printf '%s\n' '{"NodePublicAddress":"192.0.2.8","NodePublicPort":"50999","ClusterUrl":"192.0.2.7","ClusterMqttPort":"10003"}' \
  >"$R/etc/netmanager/netcfg.json"
chmod 0600 "$R/etc/netmanager/netcfg.json"
cp "$R/etc/oakestra/conf.json" "$WORK/user-conf.json"
cp "$R/etc/netmanager/netcfg.json" "$WORK/user-netcfg.json"
printf 'old binary\n' >"$B/NodeEngine" # stands for an older release
rm "$B/NetManager"
run_ok "install.sh again" env DESTDIR="$R" "$PKG/install.sh"
contains "says it kept conf.json" "kept existing $R/etc/oakestra/conf.json" "$OUT"
contains "says it kept netcfg.json" "kept existing $R/etc/netmanager/netcfg.json" "$OUT"
same_file "user's conf.json untouched" "$WORK/user-conf.json" "$R/etc/oakestra/conf.json"
same_file "user's netcfg.json untouched" "$WORK/user-netcfg.json" "$R/etc/netmanager/netcfg.json"
mode "$R/etc/netmanager/netcfg.json" 600
same_file "binary upgraded" "$PKG/NodeEngine" "$B/NodeEngine"
equal "NetManager link restored" NodeEngine "$(readlink "$B/NetManager")"
run_ok "config still reads the user's cluster" env OAK_CONFIG_DIR="$R/etc/oakestra" "$B/NodeEngine" config show
equal "config show: user's cluster address" 192.0.2.7 "$(jq -r .cluster_address <<<"$OUT")"
# A dangling symlink is still the user's choice, not an absent file.
R2=$(new_root symlinked)
mkdir -p "$R2/etc/oakestra"
ln -s /srv/elsewhere/conf.json "$R2/etc/oakestra/conf.json"
run_ok "install.sh with a symlinked conf.json" env DESTDIR="$R2" "$PKG/install.sh"
equal "symlinked conf.json left alone" /srv/elsewhere/conf.json "$(readlink "$R2/etc/oakestra/conf.json")"

section "picking the archive by architecture"
R=$(new_root picked)
mkdir -p "$WORK/tmp"
run_ok "dist/install.sh picks oakestra-worker_$ARCH.tar.gz" env TMPDIR="$WORK/tmp" DESTDIR="$R" "$DIST/install.sh"
contains "names the archive it used" "using $DIST/oakestra-worker_$ARCH.tar.gz" "$OUT"
same_file "picked the $ARCH binary" "$PKG/NodeEngine" "$R/usr/local/bin/NodeEngine"
equal "the unpacked archive is cleaned up" "" "$(ls -A "$WORK/tmp")"
for a in amd64 arm64 armhf; do
  [ -f "$DIST/oakestra-worker_$a.tar.gz" ] || continue
  R=$(new_root "picked-$a")
  run_ok "install.sh <dist> with OAK_ARCH=$a" env DESTDIR="$R" OAK_ARCH=$a "$PKG/install.sh" "$DIST"
  machine=$(readelf -h "$R/usr/local/bin/NodeEngine" | sed -n 's/^ *Machine: *//p')
  case $a in amd64) want="Advanced Micro Devices X86-64" ;; arm64) want=AArch64 ;; armhf) want=ARM ;; esac
  equal "OAK_ARCH=$a installed a $want binary" "$want" "$machine"
done
R=$(new_root by-path)
run_ok "install.sh <archive>" env DESTDIR="$R" "$PKG/install.sh" "$DIST/oakestra-worker_$ARCH.tar.gz"
same_file "installed from the named archive" "$PKG/NodeEngine" "$R/usr/local/bin/NodeEngine"
run_fails "a named archive for another architecture is refused" "this release is for $other but the machine is $ARCH" \
  env DESTDIR="$R" "$PKG/install.sh" "$DIST/oakestra-worker_$other.tar.gz"
run_fails "a file that is no release archive is refused" "cannot unpack $PKG/conf.json" \
  env DESTDIR="$R" "$PKG/install.sh" "$PKG/conf.json"
R=$(new_root via-sh)
run_ok "\`sh install.sh\` hands over to bash" env DESTDIR="$R" sh "$PKG/install.sh"
same_file "installed through sh" "$PKG/NodeEngine" "$R/usr/local/bin/NodeEngine"
run_fails "a folder without the archive is refused" "neither an unpacked worker release nor oakestra-worker_$ARCH.tar.gz" \
  env DESTDIR="$R" "$PKG/install.sh" "$EMPTY"

section "uninstall"
R="$WORK/fresh"
run_fails "uninstall rejects unknown arguments" "unknown argument" env DESTDIR="$R" "$PKG/uninstall.sh" --force
run_ok "uninstall.sh" env DESTDIR="$R" "$PKG/uninstall.sh"
absent "$R/usr/local/bin/NodeEngine"
absent "$R/usr/local/bin/NetManager"
absent "$R/etc/systemd/system/nodeengine.service"
absent "$R/etc/systemd/system/netmanager.service"
absent "$R/etc/systemd/system/multi-user.target.wants/nodeengine.service"
same_file "uninstall keeps conf.json" "$WORK/user-conf.json" "$R/etc/oakestra/conf.json"
[ -f "$R/etc/netmanager/netcfg.json" ] || fail "uninstall removed netcfg.json without --purge"
[ -f "$R/lib/systemd/system/containerd.service" ] || fail "uninstall touched containerd"
run_ok "uninstall.sh --purge" env DESTDIR="$R" "$PKG/uninstall.sh" --purge
for d in etc/oakestra etc/netmanager var/lib/oakestra var/log/oakestra; do absent "$R/$d"; done
run_ok "uninstall twice is harmless" env DESTDIR="$R" "$PKG/uninstall.sh"

printf '[%s] PASS (%d checks)\n' "$T_NAME" "$T_CHECKS"
