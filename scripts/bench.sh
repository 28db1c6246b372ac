#!/usr/bin/env bash
# The benchmark suite (issue #9): builds the binaries, runs every benchmark, and renders
# BENCHMARKS.md plus the SVG plots in docs/bench/ from the run's results (JSON lines).
#
#   sudo scripts/bench.sh                 full run (~10-15 min on 2 cores), writes BENCHMARKS.md
#   sudo scripts/bench.sh --smoke         tiny configuration (seconds each) into a temp dir;
#                                         fails if a benchmark errors, never on a missed goal
#   sudo scripts/bench.sh --only <name>   one benchmark (sizes idle deploy overlay
#                                         control-plane root-api all-idle); full-size figures,
#                                         report into target/bench/ only
#
# Everything a run creates (processes, namespaces oakb<tag>-*, the containerd/registry fixture,
# temp dirs) is removed on exit, also on failure or Ctrl-C. Root only (namespaces, containerd).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf '[bench] error: %s\n' "$*" >&2; exit 1; }

SMOKE=0 ONLY=""
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --only) ONLY=${2:?--only needs a benchmark name}; shift ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[ "$(id -u)" = 0 ] || die "run as root (network namespaces, TUN, containerd)"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
ALL=(sizes idle deploy overlay control-plane root-api all-idle)
if [ -n "$ONLY" ]; then
  [[ " ${ALL[*]} " == *" $ONLY "* ]] || die "unknown benchmark '$ONLY': choose from ${ALL[*]}"
fi

TAG=$(printf '%04x' $(($$ & 0xffff)))
if [ "$SMOKE" = 1 ]; then
  OUT=$(mktemp -d /tmp/oak-bench-smoke.XXXXXX)
  PROFILE=debug
else
  OUT=$REPO/target/bench
  rm -rf "$OUT"
  mkdir -p "$OUT"
  PROFILE=release
fi
export OAK_BENCH_OUT=$OUT OAK_BENCH_SMOKE=$SMOKE OAK_BENCH_TAG=$TAG
FIXTURE_DIR=$OUT/fixture
CHILD=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
    kill -TERM -- "-$CHILD" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$CHILD" 2>/dev/null || true
  fi
  [ ! -f "$FIXTURE_DIR/env" ] && [ ! -d "$FIXTURE_DIR" ] || bash scripts/fixture.sh down "$FIXTURE_DIR" >/dev/null 2>&1 || true
  local ns
  for ns in $(ip netns list 2>/dev/null | awk -v p="oakb$TAG-" 'index($1, p) == 1 {print $1}'); do
    ip netns del "$ns" 2>/dev/null || true
  done
  if [ "$SMOKE" = 1 ]; then
    [ $rc -eq 0 ] || { log "smoke failed; logs:"; find "$OUT" -name '*.log' -exec tail -n 5 {} + >&2 2>/dev/null || true; }
    rm -rf "$OUT"
  else
    rm -rf "$OUT/tmp"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Runs one benchmark in its own process group (so cleanup can end all it started), timed.
bench() {
  local name=$1 t0=$SECONDS rc=0
  shift
  [ -z "$ONLY" ] || [ "$ONLY" = "$name" ] || return 0
  log "==> $name"
  setsid "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  [ $rc -eq 0 ] || die "benchmark $name failed (exit $rc)"
  log "<== $name: $((SECONDS - t0)) s"
}

log "building ($PROFILE)"
if [ "$PROFILE" = release ]; then
  cargo build --release --locked -p orch-lite --bin orch-lite >&2
  cargo build --release --locked -p worker --bin NodeEngine >&2
  cargo build --release --locked -p oak-bench >&2
else
  cargo build --locked -p orch-lite -p worker -p oak-bench --bins >&2
fi
BIN=$REPO/target/$PROFILE
B=$BIN/oak-bench ORCH=$BIN/orch-lite NE=$BIN/NodeEngine
ulimit -n "$(ulimit -Hn)"

if [ "$SMOKE" = 1 ]; then
  bench sizes bash scripts/bench/sizes.sh "$B" "$OUT" --smoke "$NE"
  bench idle "$B" idle --orch "$ORCH" --worker "$NE" --warmup 1 --secs 2
else
  bench sizes bash scripts/bench/sizes.sh "$B" "$OUT"
  bench idle "$B" idle --orch "$ORCH" --worker "$NE" --warmup 30 --secs 180
fi

if [ -z "$ONLY" ] || [ "$ONLY" = deploy ]; then
  log "starting the containerd + registry fixture"
  bash scripts/fixture.sh up "$FIXTURE_DIR" --owner-pid $$ >"$OUT/fixture.log" 2>&1 ||
    { tail -20 "$OUT/fixture.log" >&2; die "fixture did not start"; }
fi
if [ "$SMOKE" = 1 ]; then
  bench deploy "$B" deploy --orch "$ORCH" --worker "$NE" --fixture-env "$FIXTURE_DIR/env" --runs 3 --netem-runs 2 --instances 3,62
else
  bench deploy "$B" deploy --orch "$ORCH" --worker "$NE" --fixture-env "$FIXTURE_DIR/env" --runs 50 --netem-runs 20 --instances 20,100
fi
# the deploy bench undeploys what it deployed; the fixture goes before the next benches
t0=$SECONDS
[ ! -d "$FIXTURE_DIR" ] || bash scripts/fixture.sh down "$FIXTURE_DIR" >/dev/null 2>&1 || true
log "fixture down: $((SECONDS - t0)) s"

if [ "$SMOKE" = 1 ]; then
  bench overlay "$B" overlay --secs 1 --pings 20 --connects 10
  bench control-plane "$B" control-plane --orch "$ORCH" --workers 20 --secs 4 --probes 3
  bench root-api "$B" root-api --orch "$ORCH" --clusters 5 --services 50 --per-app 10 --requests 5
  bench all-idle "$B" all-idle --orch "$ORCH" --secs 2
else
  bench overlay "$B" overlay --secs 5 --pings 200 --connects 100
  bench control-plane "$B" control-plane --orch "$ORCH" --workers 1000,10000 --secs 30 --probes 50
  bench root-api "$B" root-api --orch "$ORCH" --clusters 100 --services 10000 --per-app 100 --requests 50
  bench all-idle "$B" all-idle --orch "$ORCH" --secs 60
fi

commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit-dirty"
if [ "$SMOKE" = 1 ] || [ -n "$ONLY" ]; then
  "$B" report --out "$OUT/BENCHMARKS.md" --svg-dir "$OUT/svg" --svg-rel svg --commit "$commit"
  log "report: $OUT/BENCHMARKS.md ($(grep -c '' "$OUT/results.jsonl") figures; smoke output is discarded)"
else
  mkdir -p docs/bench
  "$B" report --out BENCHMARKS.md --svg-dir docs/bench --svg-rel docs/bench --commit "$commit"
  log "wrote BENCHMARKS.md and docs/bench/*.svg ($(grep -c '' "$OUT/results.jsonl") figures)"
fi
log "done in $SECONDS s"
