#!/usr/bin/env bash
# The release test, for CI (root, Debian bookworm amd64 with scripts/setup-deps.sh run): builds
# the three archives once, checks their contents and binaries, runs the armhf and arm64 binaries
# under qemu-user (version, help, a config round trip, the NetManager personality), then installs
# for real into scratch roots and a network-less chroot (tests/release/). Stops at the first
# problem with a FAIL line and a non-zero exit.
#
#   scripts/test-release.sh             build + all checks
#   OAK_SKIP_BUILD=1 scripts/test-release.sh    reuse the archives already in $OAK_DIST
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T_NAME=release
# shellcheck source=tests/release/lib.sh
. "$REPO/tests/release/lib.sh"
# shellcheck source=cross/arches.sh
. "$REPO/cross/arches.sh"
export OAK_DIST=${OAK_DIST:-$REPO/dist}
DIST=$OAK_DIST
T0=$(date +%s)

[ "$(id -u)" = 0 ] || fail "run as root (the install tests chroot and switch users)"
for tool in jq readelf objdump qemu-arm-static qemu-aarch64-static unshare chroot setpriv; do
  command -v "$tool" >/dev/null || fail "$tool not found: run scripts/setup-deps.sh"
done

section "scripts parse"
for s in scripts/install.sh scripts/uninstall.sh scripts/build-release.sh scripts/test-release.sh \
  cross/arches.sh cross/measure-size.sh tests/release/*.sh; do
  bash -n "$REPO/$s" || fail "$s does not parse"
done
ok "bash -n on every release script"
if command -v shellcheck >/dev/null; then
  (cd "$REPO" && shellcheck -x scripts/install.sh scripts/uninstall.sh scripts/build-release.sh \
    scripts/test-release.sh cross/*.sh tests/release/*.sh) || fail "shellcheck complains (above)"
  ok "shellcheck clean"
else
  section "SKIP shellcheck (not installed)"
fi

section "build"
if [ "${OAK_SKIP_BUILD:-}" = 1 ]; then
  section "SKIP build (OAK_SKIP_BUILD=1), using $DIST"
else
  tb=$(date +%s)
  "$REPO/scripts/build-release.sh" || fail "scripts/build-release.sh failed"
  ok "three archives built in $(($(date +%s) - tb)) s"
fi

WORK=$(mktemp -d /tmp/oak-release-test.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# conf.json keys in upstream's order (Go struct order, spec worker-protocol §8.3) and the
# netcfg.json keys (§7.4): what a stock NodeEngine / NetManager reads and writes.
CONF_KEYS='["conf_version","cluster_address","cluster_ssl","cluster_port","app_logs","overlay_network","public_ip","overlay_network_port","mqtt_cert_file","mqtt_key_file","addons","virtualizations","csi_drivers"]'
VIRT_KEYS='["virutalizaiton_name","virutalizaiton_runtime","virutalizaiton_active","virutalizaiton_config"]'
NETCFG_KEYS='["NodePublicAddress","NodePublicPort","ClusterUrl","ClusterMqttPort","DefaultInterface","Debug","PublicIPNetworking","MqttCert","MqttKey"]'
version=$(cut -d' ' -f1 "$DIST/oakestra-worker_amd64/VERSION" 2>/dev/null || true)

for arch in "${OAK_ARCHES[@]}"; do
  name="oakestra-worker_$arch"
  archive="$DIST/$name.tar.gz"
  section "$arch: archive"
  [ -f "$archive" ] || fail "$archive was not built"
  listing=$(tar -tvzf "$archive") || fail "$archive is not a readable tar.gz"
  expected="$name/ $name/ARCH $name/NetManager $name/NodeEngine $name/VERSION $name/conf.json $name/install.sh $name/netcfg.json $name/netmanager.service $name/nodeengine.service $name/uninstall.sh"
  equal "$arch: archive holds exactly the release files" "$expected" "$(tar -tzf "$archive" | sort | tr '\n' ' ' | sed 's/ $//')"
  grep -q "^lrwxrwxrwx .* $name/NetManager -> NodeEngine$" <<<"$listing" ||
    fail "$arch: NetManager is not a symlink to NodeEngine in the archive:"$'\n'"$listing"
  ok "$arch: NetManager -> NodeEngine symlink"
  for f in NodeEngine install.sh uninstall.sh; do
    grep -q "^-rwxr-xr-x 0/0 .* $name/$f$" <<<"$listing" || fail "$arch: $f is not 0755 root-owned in the archive"
  done
  for f in conf.json netcfg.json nodeengine.service netmanager.service ARCH VERSION; do
    grep -q "^-rw-r--r-- 0/0 .* $name/$f$" <<<"$listing" || fail "$arch: $f is not 0644 root-owned in the archive"
  done
  ok "$arch: modes and owners"
  tar -xzf "$archive" -C "$WORK"
  P="$WORK/$name"
  equal "$arch: ARCH file" "$arch" "$(cat "$P/ARCH")"
  equal "$arch: VERSION file names the workspace version" "$version" "$(cut -d' ' -f1 "$P/VERSION")"
  for f in install.sh uninstall.sh; do same_file "$arch: $f is the repository's" "$REPO/scripts/$f" "$P/$f"; done
  for f in nodeengine.service netmanager.service; do same_file "$arch: $f" "$REPO/scripts/systemd/$f" "$P/$f"; done
  same_file "$arch: netcfg.json" "$REPO/cross/netcfg.json" "$P/netcfg.json"
  equal "$arch: conf.json has upstream's keys in upstream's order" "$CONF_KEYS" "$(jq -c keys_unsorted "$P/conf.json")"
  equal "$arch: conf.json virtualization entry keys (upstream's spelling)" "$VIRT_KEYS" "$(jq -c '.virtualizations[0] | keys_unsorted' "$P/conf.json")"
  equal "$arch: conf.json defaults" '"0.0.0.0" 10100 "default" "containerd" true' \
    "$(jq -c '.cluster_address, .cluster_port, .overlay_network, .virtualizations[0].virutalizaiton_name, .virtualizations[0].virutalizaiton_active' "$P/conf.json" | tr '\n' ' ' | sed 's/ $//')"
  [ "$(wc -l <"$P/conf.json")" = 0 ] || fail "$arch: conf.json is not compact one-line JSON like Go's json.Marshal"
  [ "$arch" = amd64 ] || same_file "$arch: conf.json identical to amd64's" "$WORK/oakestra-worker_amd64/conf.json" "$P/conf.json"
  equal "$arch: netcfg.json keys" "$NETCFG_KEYS" "$(jq -c keys_unsorted "$P/netcfg.json")"

  section "$arch: binary"
  B="$P/NodeEngine"
  hdr=$(readelf -h "$B")
  case $arch in
    amd64) want="Advanced Micro Devices X86-64" ;;
    arm64) want=AArch64 ;;
    armhf) want=ARM ;;
  esac
  equal "$arch: ELF machine" "$want" "$(sed -n 's/^ *Machine: *//p' <<<"$hdr")"
  if [ "$arch" = armhf ]; then
    contains "armhf: hard-float EABI5 (Debian armhf ABI)" "hard-float ABI" "$(sed -n 's/^ *Flags: *//p' <<<"$hdr")"
    attrs=$(readelf -A "$B")
    contains "armhf: built for ARMv7 (Raspberry Pi 2 and later)" "Tag_CPU_arch: v7" "$attrs"
  fi
  if readelf -S "$B" | grep -q '\.debug_\|\.symtab'; then fail "$arch: binary is not stripped"; fi
  ok "$arch: stripped"
  needed=$(readelf -d "$B" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')
  for lib in $needed; do
    case $lib in libc.so.6 | libgcc_s.so.1 | libm.so.6 | ld-linux*) ;; *) fail "$arch: unexpected library dependency $lib" ;; esac
  done
  ok "$arch: links only glibc and libgcc_s ($needed)"
  # Debian / Raspberry Pi OS bookworm ship glibc 2.36: nothing newer may be required.
  newest=$(objdump -T "$B" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -Vu | tail -1)
  [ "$(printf '%s\n2.36\n' "$newest" | sort -V | tail -1)" = 2.36 ] ||
    fail "$arch: needs glibc $newest, newer than bookworm's 2.36"
  ok "$arch: newest glibc symbol version $newest <= 2.36 (bookworm)"

  section "$arch: runs ($([ "$arch" = "$(oak_host_arch)" ] && echo natively || echo under qemu-user))"
  run_ok "$arch: NodeEngine version" oak_run "$arch" "$B" version
  contains "$arch: version output" "NodeEngine $version (Oakestra" "$OUT"
  run_ok "$arch: NodeEngine help" oak_run "$arch" "$B" help
  contains "$arch: help shows usage" "Usage:" "$OUT"
  contains "$arch: help lists config commands" "config network auto | manual" "$OUT"
  cfg="$WORK/cfg-$arch"
  mkdir -p "$cfg"
  export OAK_CONFIG_DIR=$cfg OAK_NETCFG="$P/netcfg.json"
  run_ok "$arch: config cluster 10.1.2.3 -p 10200" oak_run "$arch" "$B" config cluster 10.1.2.3 -p 10200
  run_ok "$arch: config network manual /run/x.sock" oak_run "$arch" "$B" config network manual /run/x.sock
  run_ok "$arch: config show" oak_run "$arch" "$B" config show
  show=$OUT
  jq -e . >/dev/null <<<"$show" || fail "$arch: config show is not JSON: $show"
  equal "$arch: show cluster_address" 10.1.2.3 "$(jq -r .cluster_address <<<"$show")"
  equal "$arch: show cluster_port" 10200 "$(jq -r .cluster_port <<<"$show")"
  equal "$arch: show network" manual:/run/x.sock "$(jq -r .network <<<"$show")"
  equal "$arch: show config_dir" "$cfg" "$(jq -r .config_dir <<<"$show")"
  equal "$arch: show tunnel_port from the shipped netcfg.json" 50103 "$(jq -r .tunnel_port <<<"$show")"
  conf="$cfg/conf.json"
  equal "$arch: written conf.json keeps upstream's shape" "$CONF_KEYS" "$(jq -c keys_unsorted "$conf")"
  equal "$arch: written conf.json values" '"10.1.2.3" 10200 false "custom:/run/x.sock"' \
    "$(jq -c '.cluster_address, .cluster_port, .cluster_ssl, .overlay_network' "$conf" | tr '\n' ' ' | sed 's/ $//')"
  export OAK_CLUSTER_PORT=10300
  run_ok "$arch: OAK_CLUSTER_PORT wins over conf.json" oak_run "$arch" "$B" config show
  unset OAK_CLUSTER_PORT
  equal "$arch: environment override" 10300 "$(jq -r .cluster_port <<<"$OUT")"
  run_ok "$arch: config default resets" oak_run "$arch" "$B" config default
  same_file "$arch: reset conf.json equals the shipped default" "$P/conf.json" "$conf"
  unset OAK_CONFIG_DIR OAK_NETCFG
  # Through the symlink, as the netmanager unit starts it: qemu passes the link's path as argv[0].
  run_ok "$arch: NetManager version (through the symlink)" oak_run "$arch" "$P/NetManager" version
  contains "$arch: NetManager version output" "$version" "$OUT"
  run_fails "$arch: NetManager personality (takes no flags)" "NetManager takes no arguments" \
    oak_run "$arch" "$P/NetManager" -p 6000
  run_fails "$arch: NodeEngine personality differs" "needs a value" oak_run "$arch" "$B" -p
done

section "install tests"
"$REPO/tests/release/install-test.sh" "$DIST" || fail "tests/release/install-test.sh failed"
section "chroot tests"
"$REPO/tests/release/chroot-test.sh" "$DIST" || fail "tests/release/chroot-test.sh failed"

section "sizes"
for arch in "${OAK_ARCHES[@]}"; do
  printf '[release]   %-6s NodeEngine %8d B   archive %8d B\n' "$arch" \
    "$(stat -c %s "$WORK/oakestra-worker_$arch/NodeEngine")" "$(stat -c %s "$DIST/oakestra-worker_$arch.tar.gz")"
done
printf '[release] PASS (%d checks here, plus the install and chroot tests) in %d s\n' "$T_CHECKS" "$(($(date +%s) - T0))"
