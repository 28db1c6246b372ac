#!/usr/bin/env bash
# Measures the stripped NodeEngine for opt-level "s" and "z" on every release architecture and
# prints a Markdown table (the figures in cross/README.md come from here).
#
#   cross/measure-size.sh [arch...]     default: amd64 arm64 armhf
#
# Each opt-level builds in its own target folder (target/size-<level>) from scratch, so the
# build times are comparable and the normal release build is not invalidated. Everything else
# comes from the workspace's release profile.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=cross/arches.sh
. "$REPO/cross/arches.sh"
ARCHES=("$@")
[ ${#ARCHES[@]} -gt 0 ] || ARCHES=("${OAK_ARCHES[@]}")

declare -A size secs
for level in s z; do
  dir="$REPO/target/size-$level"
  rm -rf "$dir"
  for arch in "${ARCHES[@]}"; do
    triple=$(oak_triple "$arch") || { echo "unsupported architecture $arch" >&2; exit 1; }
    t0=$(date +%s)
    (cd "$REPO" && CARGO_PROFILE_RELEASE_OPT_LEVEL=$level CARGO_TARGET_DIR="$dir" \
      cargo build --quiet --release --locked -p worker --bin NodeEngine --target "$triple")
    secs[$level,$arch]=$(($(date +%s) - t0))
    size[$level,$arch]=$(stat -c %s "$dir/$triple/release/NodeEngine")
  done
done

rev=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
echo "NodeEngine, stripped, release profile (fat LTO, codegen-units 1, panic abort), commit $rev, $(rustc --version)"
echo
echo "| arch | target | opt-level \"s\" | opt-level \"z\" | z vs s | build s / z (clean) |"
echo "|---|---|---:|---:|---:|---:|"
for arch in "${ARCHES[@]}"; do
  s=${size[s,$arch]} z=${size[z,$arch]}
  delta=$(awk -v s="$s" -v z="$z" 'BEGIN { printf "%+.1f%%", (z - s) * 100 / s }')
  printf '| %s | %s | %d B (%d KiB) | %d B (%d KiB) | %s | %d s / %d s |\n' "$arch" "$(oak_triple "$arch")" \
    "$s" $((s / 1024)) "$z" $((z / 1024)) "$delta" "${secs[s,$arch]}" "${secs[z,$arch]}"
done
