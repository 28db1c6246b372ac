#!/usr/bin/env bash
# Builds the worker release archives dist/oakestra-worker_<arch>.tar.gz (Debian architecture
# names: amd64, arm64, armhf) with their installer, units and default configs.
#
#   scripts/build-release.sh [arch...]     default: amd64 arm64 armhf
#
# Environment: OAK_DIST (output folder, default <repo>/dist), CARGO_TARGET_DIR (as cargo),
# SOURCE_DATE_EPOCH (archive timestamps; default: the last commit's date, so rebuilding the same
# commit gives the same archives).
set -euo pipefail

log() { printf '[build-release] %s\n' "$*"; }
die() { printf '[build-release] error: %s\n' "$*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cross/arches.sh
. "$REPO/cross/arches.sh"

DIST=${OAK_DIST:-$REPO/dist}
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
ARCHES=("$@")
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=("${OAK_ARCHES[@]}")

command -v cargo >/dev/null || die "cargo not found: install Rust with rustup, then run scripts/setup-deps.sh"
installed_targets=$(rustup target list --installed 2>/dev/null || true)
triples=()
for arch in "${ARCHES[@]}"; do
  triple=$(oak_triple "$arch") ||
    die "unsupported architecture '$arch': choose from ${OAK_ARCHES[*]} (Debian names)"
  grep -qx "$triple" <<<"$installed_targets" ||
    die "Rust target $triple ($arch) is not installed: run scripts/setup-deps.sh (or rustup target add $triple)"
  linker=$(oak_linker "$arch")
  [ -z "$linker" ] || command -v "$linker" >/dev/null ||
    die "cross linker $linker ($arch) not found: run scripts/setup-deps.sh (Debian package gcc-${linker%-gcc})"
  if [ "$arch" != "$(oak_host_arch)" ]; then
    # The default conf.json is produced by each archive's own binary (below), under qemu-user.
    case $arch in
      arm64) command -v qemu-aarch64-static >/dev/null ;;
      armhf) command -v qemu-arm-static >/dev/null ;;
      *) false ;;
    esac || die "qemu-user for $arch not found: apt-get install qemu-user-static (run scripts/setup-deps.sh)"
  fi
  triples+=("$triple")
done

# One cargo run for all targets: cargo shares its job server across them, which keeps both
# cores busy while one target is in its (single-threaded) fat-LTO link.
target_args=()
for t in "${triples[@]}"; do target_args+=(--target "$t"); done
log "cargo build --release -p worker --bin NodeEngine ${target_args[*]}"
t0=$(date +%s)
(cd "$REPO" && cargo build --release --locked -p worker --bin NodeEngine "${target_args[@]}")
log "built in $(($(date +%s) - t0)) s"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$REPO/Cargo.toml")
[ -n "$version" ] || die "cannot read [workspace.package] version from Cargo.toml"
rev=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [ "$rev" != unknown ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  rev="$rev-dirty"
fi
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)}

mkdir -p "$DIST"
# The installers also sit next to the archives: `dist/install.sh` picks the archive that
# matches the machine (dpkg --print-architecture).
install -m 0755 "$REPO/scripts/install.sh" "$REPO/scripts/uninstall.sh" "$DIST/"

sizes=()
for i in "${!ARCHES[@]}"; do
  arch=${ARCHES[$i]} triple=${triples[$i]}
  bin="$TARGET_DIR/$triple/release/NodeEngine"
  [ -x "$bin" ] || die "cargo did not produce $bin"
  name="oakestra-worker_$arch"
  stage="$DIST/$name"
  rm -rf "$stage"
  mkdir -p "$stage"
  install -m 0755 "$bin" "$stage/NodeEngine"
  ln -s NodeEngine "$stage/NetManager"
  install -m 0755 "$REPO/scripts/install.sh" "$REPO/scripts/uninstall.sh" "$stage/"
  install -m 0644 "$REPO/scripts/systemd/nodeengine.service" "$REPO/scripts/systemd/netmanager.service" "$stage/"
  install -m 0644 "$REPO/cross/netcfg.json" "$stage/netcfg.json"
  # conf.json is whatever this very binary writes for `config default`, so the template can
  # never drift from the code.
  gen=$(mktemp -d)
  if ! OAK_CONFIG_DIR="$gen" oak_run "$arch" "$stage/NodeEngine" config default >/dev/null ||
    [ ! -s "$gen/conf.json" ]; then
    rm -rf "$gen"
    die "$arch: \`NodeEngine config default\` did not write conf.json (does the $arch binary run here?)"
  fi
  install -m 0644 "$gen/conf.json" "$stage/conf.json"
  rm -rf "$gen"
  printf '%s\n' "$arch" >"$stage/ARCH"
  printf '%s %s\n' "$version" "$rev" >"$stage/VERSION"
  # Reproducible archive: fixed order, owner and timestamps, no gzip timestamp.
  tar -C "$DIST" --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$SOURCE_DATE_EPOCH" \
    -cf - "$name" | gzip -9n >"$DIST/$name.tar.gz.tmp"
  mv -f "$DIST/$name.tar.gz.tmp" "$DIST/$name.tar.gz"
  sizes+=("$(printf '%-6s %-32s NodeEngine %8d B   %s.tar.gz %8d B' "$arch" "$triple" \
    "$(stat -c %s "$stage/NodeEngine")" "$name" "$(stat -c %s "$DIST/$name.tar.gz")")")
done

# Checksums of whatever archives the folder holds (earlier runs may have built other arches).
(cd "$DIST" && sha256sum oakestra-worker_*.tar.gz >SHA256SUMS)

log "version $version ($rev), archives in $DIST:"
printf '  %s\n' "${sizes[@]}"
