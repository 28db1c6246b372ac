# shellcheck shell=bash disable=SC2034
# Sourced by scripts/build-release.sh, scripts/test-release.sh and cross/measure-size.sh: the one
# place that maps Debian architecture names (what `dpkg --print-architecture` says, and what the
# archives are named after) to Rust targets, cross linkers and qemu-user emulators.

OAK_ARCHES=(amd64 arm64 armhf)

# Rust target triple for a Debian architecture; empty (status 1) if unsupported.
oak_triple() {
  case $1 in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
    *) return 1 ;;
  esac
}

# Cross C compiler used as linker (.cargo/config.toml names the same ones); empty for amd64.
oak_linker() {
  case $1 in
    arm64) echo aarch64-linux-gnu-gcc ;;
    armhf) echo arm-linux-gnueabihf-gcc ;;
    *) echo "" ;;
  esac
}

# Debian architecture of this machine.
oak_host_arch() { dpkg --print-architecture; }

# Runs a binary built for <arch>: natively on a matching host, else under qemu-user with the
# cross glibc as sysroot (binfmt_misc is not relied on: CI machines may not have it mounted).
oak_run() {
  local arch=$1; shift
  if [ "$arch" = "$(oak_host_arch)" ]; then
    "$@"
    return
  fi
  case $arch in
    arm64) qemu-aarch64-static -L /usr/aarch64-linux-gnu "$@" ;;
    armhf) qemu-arm-static -L /usr/arm-linux-gnueabihf "$@" ;;
    amd64) qemu-x86_64-static -L / "$@" ;;
    *) echo "oak_run: unsupported architecture $arch" >&2; return 1 ;;
  esac
}
