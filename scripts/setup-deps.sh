#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian bookworm (run as root).
# Idempotent: re-running only checks. Needs no network beyond Debian's and Rust's package
# registries (apt, rustup, crates.io).
set -euo pipefail

log() { printf '[setup-deps] %s\n' "$*"; }
die() { printf '[setup-deps] error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages)"
command -v apt-get >/dev/null || die "this script targets Debian/Ubuntu (apt-get not found)"

export DEBIAN_FRONTEND=noninteractive

# Packages: runtime parts the tests start for real, cross toolchains, qemu for foreign binaries.
PKGS=(
  build-essential pkg-config ca-certificates curl jq git xz-utils shellcheck
  containerd runc
  docker-registry
  mosquitto mosquitto-clients
  iproute2 iptables nftables iputils-ping procps psmisc util-linux
  busybox-static
  qemu-user-static binfmt-support
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross
)
# Architectures whose busybox-static goes into the multi-arch test images (besides the host's).
FOREIGN=(arm64 armhf)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq -o Acquire::Retries=3
  apt-get install -y -qq --no-install-recommends -o Acquire::Retries=3 "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

# The tests start their own private containerd, registry and mosquitto; the distribution's
# services are not needed and would only hold ports and state.
if [ -d /run/systemd/system ]; then
  for unit in docker-registry mosquitto; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi

# busybox-static for every architecture the test images carry (amd64 from the host package).
BB_CACHE=${OAK_BUSYBOX_CACHE:-/var/cache/oakestra-test/busybox}
mkdir -p "$BB_CACHE"
cp -f /bin/busybox "$BB_CACHE/busybox-$(dpkg --print-architecture)"
# Foreign packages are fetched through a private apt state (own lists, no dpkg status), so the
# machine's dpkg architectures and apt indexes stay untouched.
fetch_foreign_busybox() {
  local arch=$1 tmp opts
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main" \
    >"$tmp/sources.list"
  opts=(-qq -o Acquire::Retries=3 -o APT::Sandbox::User=root
    -o Dir::State::Lists="$tmp/lists" -o Dir::Etc::SourceList="$tmp/sources.list"
    -o Dir::Etc::SourceParts=/dev/null -o Dir::Cache="$tmp/cache" -o Dir::State::status=/dev/null
    -o APT::Architecture="$arch" -o APT::Architectures="$arch")
  apt-get "${opts[@]}" update
  (cd "$tmp" && apt-get "${opts[@]}" download "busybox-static:$arch")
  dpkg-deb -x "$tmp"/busybox-static_*_"$arch".deb "$tmp/root"
  install -m 0755 "$tmp/root/bin/busybox" "$BB_CACHE/busybox-$arch"
  rm -rf "$tmp"
}
for a in "${FOREIGN[@]}"; do
  [ -x "$BB_CACHE/busybox-$a" ] || { log "fetching busybox-static:$a"; fetch_foreign_busybox "$a"; }
done

# containerd 1.7 next to the host's 1.6: the worker's hand-written gRPC client must speak to both
# (issue #4), and bookworm ships only 1.6. Trixie's build is Go linked against glibc >= 2.34 only,
# so it runs here; its shim drives the host's runc (containerd 1.7 accepts runc >= 1.0). Fetched
# through a private apt state like the busybox above, unpacked under the test cache, never
# installed: the host's containerd, apt sources and dpkg database stay as they are.
CTRD17_DIR=${OAK_CONTAINERD17_DIR:-/var/cache/oakestra-test/containerd-1.7}
fetch_containerd17() {
  local tmp opts arch
  arch=$(dpkg --print-architecture)
  tmp=$(mktemp -d)
  mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
    >"$tmp/sources.list"
  opts=(-qq -o Acquire::Retries=3 -o APT::Sandbox::User=root
    -o Dir::State::Lists="$tmp/lists" -o Dir::Etc::SourceList="$tmp/sources.list"
    -o Dir::Etc::SourceParts=/dev/null -o Dir::Cache="$tmp/cache" -o Dir::State::status=/dev/null
    -o APT::Architecture="$arch" -o APT::Architectures="$arch")
  apt-get "${opts[@]}" update
  (cd "$tmp" && apt-get "${opts[@]}" download "containerd:$arch")
  dpkg-deb -x "$tmp"/containerd_*_"$arch".deb "$tmp/root"
  # Staged then renamed, so an interrupted fetch never leaves a half-filled dir that looks done.
  rm -rf "$CTRD17_DIR.new"
  mkdir -p "$CTRD17_DIR.new/bin"
  local b
  for b in containerd containerd-shim-runc-v2 ctr; do
    install -m 0755 "$tmp/root/usr/bin/$b" "$CTRD17_DIR.new/bin/$b"
  done
  "$CTRD17_DIR.new/bin/containerd" --version | awk '{print $3}' >"$CTRD17_DIR.new/VERSION"
  rm -rf "$CTRD17_DIR" "$tmp"
  mv "$CTRD17_DIR.new" "$CTRD17_DIR"
}
ctrd17_ok() {
  [ -x "$CTRD17_DIR/bin/containerd-shim-runc-v2" ] && [ -x "$CTRD17_DIR/bin/ctr" ] &&
    "$CTRD17_DIR/bin/containerd" --version 2>/dev/null | awk '{print $3}' | grep -q '^1\.7\.'
}
if ! ctrd17_ok; then
  log "fetching containerd 1.7 (Debian trixie) into $CTRD17_DIR"
  fetch_containerd17
  ctrd17_ok || die "containerd from trixie in $CTRD17_DIR does not run or is not 1.7"
fi

# Rust: the toolchain comes with the machine (rustup); add the cross targets and tools.
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v rustup >/dev/null || die "rustup not found: install Rust with rustup first (https://rustup.rs)"
installed=$(rustup target list --installed)
for t in armv7-unknown-linux-gnueabihf aarch64-unknown-linux-gnu; do
  grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; rustup target add "$t"; }
done
for c in rustfmt clippy; do
  rustup component list --installed | grep -q "^$c" || rustup component add "$c"
done

log "ok: $(containerd --version | awk '{print $1, $3}') (and $(cat "$CTRD17_DIR/VERSION") in $CTRD17_DIR), runc $(runc --version | awk 'NR==1{print $3}'), mosquitto $(mosquitto -h 2>/dev/null | awk 'NR==1{print $3}'), $(cargo --version)"
