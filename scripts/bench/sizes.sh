#!/usr/bin/env bash
# Benchmark 1a: stripped worker binary size per architecture, from the release archives'
# binaries (scripts/build-release.sh into a private dist folder). Baseline, same run: Debian's
# busybox-static for the same architecture (the static multi-call tool every image carries).
#
#   scripts/bench/sizes.sh <oak-bench> <out dir> [--smoke <host NodeEngine>]
# Smoke: no cross builds; measures the given host binary (figure meaningless, path exercised).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$1 OUT=$2
BB_CACHE=${OAK_BUSYBOX_CACHE:-/var/cache/oakestra-test/busybox}
MIB=1048576

mib() { awk -v b="$1" -v m="$MIB" 'BEGIN { printf "%.3f", b / m }'; }

record_size() {
  local arch=$1 bin=$2 note=$3 size base=() goal=()
  size=$(stat -c %s "$bin")
  if [ -f "$BB_CACHE/busybox-$arch" ]; then
    base=(--baseline-name "busybox-static ($arch)" --baseline "$(mib "$(stat -c %s "$BB_CACHE/busybox-$arch")")")
  fi
  [ "$arch" != armhf ] || goal=(--goal-op le --goal-value 4 --goal-text "≤ 4 MiB (armhf)")
  "$BENCH" record --section footprint --name "NodeEngine stripped binary size, $arch" \
    --value "$(mib "$size")" --unit MiB "${base[@]}" "${goal[@]}" --notes "$size bytes; $note"
}

if [ "${3:-}" = --smoke ]; then
  record_size "$(dpkg --print-architecture)" "$4" "smoke: host build as it is, no cross builds"
  exit 0
fi

dist="$OUT/dist"
OAK_DIST=$dist bash "$REPO/scripts/build-release.sh" >"$OUT/build-release.log" 2>&1 ||
  { tail -20 "$OUT/build-release.log" >&2; exit 1; }
for arch in armhf arm64 amd64; do
  record_size "$arch" "$dist/oakestra-worker_$arch/NodeEngine" "scripts/build-release.sh (fat LTO, opt-level z, panic=abort, stripped, glibc)"
done
