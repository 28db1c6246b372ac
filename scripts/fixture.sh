#!/usr/bin/env bash
# Shared test fixture: a private containerd and a private docker-registry under one directory,
# with a multi-arch busybox test image pushed to the registry.
#
#   scripts/fixture.sh up <dir> [--owner-pid <pid>]   start; writes and prints <dir>/env
#   scripts/fixture.sh down <dir>                     stop everything, remove <dir> (idempotent)
#
# --owner-pid starts a detached watchdog that runs `down` when that process is gone, so a test
# killed with SIGKILL still leaves nothing behind. Everything `down` touches is identified as
# belonging to <dir> (pid files checked against cmdlines, shims by their -address, mounts under
# <dir>, cgroups and runc state of containers whose bundles live in <dir>). Root only.
# <dir>/env holds plain KEY=VALUE lines (no quoting needed; dir names are restricted): in a shell,
# `set -a; . <dir>/env; set +a` exports them (ctr then honours CONTAINERD_ADDRESS and
# CONTAINERD_SNAPSHOTTER). Pull over plain HTTP: `ctr images pull --plain-http "$FIXTURE_IMAGE"`.
# Environment: OAK_BUSYBOX_CACHE (busybox-<debian arch> binaries), OAK_FIXTURE_CACHE (built image
# cache, keyed by its inputs; default /var/cache/oakestra-test/fixture-image, empty: off),
# FIXTURE_WAIT_SECS (default 20), FIXTURE_REGISTRY_HOST (default 127.0.0.1: where the registry
# binds, see start_registry), FIXTURE_CONTAINERD (containerd binary to run, default the one
# on PATH; e.g. /var/cache/oakestra-test/containerd-1.7/bin/containerd from setup-deps.sh: its dir
# goes first on containerd's PATH so the shim and ctr beside it are the ones used).
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
LIB=$(dirname "$SCRIPT")/lib
MARKER=.oak-fixture
REPO=oak/busybox
WAIT_SECS=${FIXTURE_WAIT_SECS:-20}
# containerd-shim-runc-v2 keeps runc state under this root (per namespace) unless the client
# passes runc options; containerd 1.6 puts shim sockets under /run/containerd/s whatever its state.
RUNC_ROOT=/run/containerd/runc
SHIM_SOCKET_DIR=/run/containerd/s
FIFO_DIR=/run/containerd/fifo

log() { printf '[fixture] %s\n' "$*" >&2; }
die() { printf '[fixture] error: %s\n' "$*" >&2; exit 1; }

usage() {
  cat >&2 <<'USAGE'
usage: fixture.sh up <dir> [--owner-pid <pid>]
       fixture.sh down <dir>
USAGE
  exit 2
}

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it starts containerd, mounts snapshots, creates cgroups); try: sudo $SCRIPT $*"
}

# abs_dir <dir>: absolute path; restricted characters so it is safe in configs, cmdlines, env lines.
abs_dir() {
  local d
  d=$(realpath -m -- "$1")
  case $d in / | /tmp | /run | /var | /var/tmp | /root | /home) die "refusing to use $d as a fixture dir" ;; esac
  [[ $d =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "fixture dir '$d' may only contain letters, digits and ._/+-"
  [ ${#d} -le 80 ] || die "fixture dir '$d' is too long for a unix socket path (keep it under 80 chars)"
  echo "$d"
}

# Process helpers. A pid is ours only if its cmdline still names our dir (pids get reused).
cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }
pid_is_ours() {
  local c
  [ -n "${1:-}" ] && [ -d "/proc/$1" ] || return 1
  c=$(cmdline "$1")
  [[ $c == *"$2/"* || $c == *" $2 "* ]]
}
start_time() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }
# kill_wait <pid> <secs>: TERM, wait, then KILL.
kill_wait() {
  local pid=$1 secs=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < secs * 10; i++)); do
    [ -d "/proc/$pid" ] || return 0
    [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ] || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# free_port: a loopback TCP port nobody listens on now, below the ephemeral range so outgoing
# connections cannot hold it (the registry start retries if another process wins the race).
free_port() {
  local p i low=32768
  read -r low _ </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || true
  [ "$low" -gt 11000 ] || low=32768
  for ((i = 0; i < 50; i++)); do
    p=$((10000 + RANDOM % (low - 10000)))
    if ! ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return 0
    fi
  done
  die "found no free loopback port"
}

log_tail() { [ -f "$1" ] && { echo "--- last lines of $1:"; tail -n 25 "$1"; echo "---"; } >&2 || true; }

# ---------------------------------------------------------------------------------------------
# up

probe_overlay() {
  local p=$1/overlay-probe ok=1
  mkdir -p "$p"/{l,u,w,m}
  if mount -t overlay overlay -o "lowerdir=$p/l,upperdir=$p/u,workdir=$p/w" "$p/m" 2>/dev/null; then
    umount "$p/m" && ok=0
  fi
  rm -rf "$p"
  return $ok
}

write_containerd_config() {
  local dir=$1
  # Only what ctr and our worker use: no CRI, no exotic snapshotters, no
  # /opt/containerd; this keeps start-up well under a second.
  cat >"$dir/containerd.toml" <<TOML
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.opt",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""
TOML
}

# containerd_bin: the containerd to start (FIXTURE_CONTAINERD or PATH's), as an absolute path.
containerd_bin() {
  local b=${FIXTURE_CONTAINERD:-containerd}
  case $b in
    */*) [ -x "$b" ] || die "FIXTURE_CONTAINERD=$b is not an executable (run scripts/setup-deps.sh?)" ;;
    *) b=$(command -v "$b") || die "containerd not found: run scripts/setup-deps.sh" ;;
  esac
  realpath -- "$b"
}

start_containerd() {
  local dir=$1 snap=$2 i bin bindir
  bin=$(containerd_bin)
  bindir=$(dirname "$bin")
  mkdir -p "$dir/containerd/root" "$dir/containerd/state"
  write_containerd_config "$dir"
  # containerd looks the shim up on PATH first; a containerd from another dir must get the shim
  # of its own release, and the version probes below its own ctr.
  PATH=$bindir:$PATH setsid "$bin" --config "$dir/containerd.toml" </dev/null >"$dir/containerd.log" 2>&1 &
  echo $! >"$dir/containerd.pid"
  echo "$bin" >"$dir/containerd.bin"
  for ((i = 0; i < WAIT_SECS * 10; i++)); do
    if ! [ -d "/proc/$(cat "$dir/containerd.pid")" ]; then
      log_tail "$dir/containerd.log"
      die "$bin exited during start-up (config $dir/containerd.toml)"
    fi
    if [ -S "$dir/containerd.sock" ] && PATH=$bindir:$PATH ctr -a "$dir/containerd.sock" version >/dev/null 2>&1; then
      # Plugins fail softly (a warning in the log); the ones tests need must be up.
      local ok p bad=""
      ok=$(PATH=$bindir:$PATH ctr -a "$dir/containerd.sock" plugins ls | awk '$4 == "ok" {print $1 "/" $2}')
      for p in io.containerd.grpc.v1/{tasks,content,images,snapshots,containers,leases,diff} \
        io.containerd.runtime.v2/task "io.containerd.snapshotter.v1/$snap"; do
        grep -qx "$p" <<<"$ok" || bad+=" $p"
      done
      [ -z "$bad" ] && return 0
      log_tail "$dir/containerd.log"
      die "containerd on $dir/containerd.sock lacks plugins:$bad (see $dir/containerd.log)"
    fi
    sleep 0.1
  done
  log_tail "$dir/containerd.log"
  die "containerd did not answer on $dir/containerd.sock within ${WAIT_SECS}s"
}

# FIXTURE_REGISTRY_HOST (default 127.0.0.1): the IPv4 address the registry binds and the image
# names carry, so that workers in other network namespaces (the multi-host tests' LAN) can pull.
start_registry() {
  local dir=$1 port attempt i pid host=${FIXTURE_REGISTRY_HOST:-127.0.0.1}
  [[ $host =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "FIXTURE_REGISTRY_HOST=$host is not an IPv4 address"
  mkdir -p "$dir/registry/data"
  for ((attempt = 0; attempt < 5; attempt++)); do
    port=$(free_port)
    cat >"$dir/registry/config.yml" <<YAML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/registry/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $host:$port
YAML
    setsid docker-registry serve "$dir/registry/config.yml" </dev/null >"$dir/registry.log" 2>&1 &
    pid=$!
    echo "$pid" >"$dir/registry.pid"
    for ((i = 0; i < WAIT_SECS * 10; i++)); do
      if ! [ -d "/proc/$pid" ]; then
        if grep -q 'address already in use' "$dir/registry.log"; then
          log "port $port was taken meanwhile; retrying"
          continue 2
        fi
        log_tail "$dir/registry.log"
        die "docker-registry exited during start-up (config $dir/registry/config.yml)"
      fi
      if curl -fsS -o /dev/null --max-time 2 "http://$host:$port/v2/" 2>/dev/null; then
        echo "$host:$port" >"$dir/registry.addr"
        return 0
      fi
      sleep 0.1
    done
    log_tail "$dir/registry.log"
    die "docker-registry did not answer on $host:$port within ${WAIT_SECS}s"
  done
  die "docker-registry could not bind a free port after 5 attempts"
}

# The watchdog runs `down` once the owner is gone and the `up` that started it has finished (so
# the two never race). Start times guard against pid reuse.
start_watchdog() {
  local dir=$1 owner=$2
  [ -d "/proc/$owner" ] || die "--owner-pid $owner: no such process"
  setsid bash "$SCRIPT" __watchdog "$dir" "$owner" "$(start_time "$owner")" "$$" "$(start_time $$)" \
    </dev/null >>"$dir/watchdog.log" 2>&1 &
  echo $! >"$dir/watchdog.pid"
}

watchdog() {
  local dir=$1 owner=$2 owner_st=$3 up=$4 up_st=$5
  while [ -f "$dir/$MARKER" ]; do
    if [ "$(start_time "$owner")" != "$owner_st" ] && [ "$(start_time "$up")" != "$up_st" ]; then
      log "owner $owner is gone: tearing down $dir"
      OAK_FIXTURE_FROM_WATCHDOG=1 exec bash "$SCRIPT" down "$dir"
    fi
    sleep 0.3
  done
}

cmd_up() {
  local dir owner=""
  [ $# -ge 1 ] || usage
  dir=$(abs_dir "$1")
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --owner-pid) [ $# -ge 2 ] || usage; owner=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [[ -z $owner || $owner =~ ^[0-9]+$ ]] || die "--owner-pid wants a pid, got '$owner'"
  local t
  for t in containerd ctr runc docker-registry curl jq tar gzip sha256sum ss setsid findmnt; do
    command -v "$t" >/dev/null || die "$t not found: run scripts/setup-deps.sh"
  done
  if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
    die "$dir exists and is not empty: pick a new dir, or run: $SCRIPT down $dir"
  fi
  mkdir -p "$dir"
  echo "$$" >"$dir/$MARKER"
  export FIXTURE_DIR=$dir
  local t0=$SECONDS
  # Whatever fails from here on, leave nothing running.
  trap 'rc=$?; if [ $rc -ne 0 ]; then log "up failed (exit $rc): tearing down $dir"; bash "$SCRIPT" down "$dir" >&2 || true; fi' EXIT
  trap 'exit 130' INT TERM HUP
  [ -z "$owner" ] || start_watchdog "$dir" "$owner"

  local snap=native
  if probe_overlay "$dir"; then snap=overlayfs; else log "overlayfs unavailable under $dir: using the native snapshotter"; fi

  # shellcheck source=lib/image.sh
  . "$LIB/image.sh"
  start_containerd "$dir" "$snap"
  start_registry "$dir"
  local reg
  reg=$(cat "$dir/registry.addr")
  prepare_image "$dir" "${OAK_BUSYBOX_CACHE:-/var/cache/oakestra-test/busybox}"
  push_image "$reg" "$REPO" "$dir/image"

  {
    echo "FIXTURE_DIR=$dir"
    echo "OAK_CONTAINERD_SOCKET=$dir/containerd.sock"
    echo "CONTAINERD_ADDRESS=$dir/containerd.sock"
    echo "OAK_CONTAINERD_SNAPSHOTTER=$snap"
    echo "CONTAINERD_SNAPSHOTTER=$snap"
    echo "FIXTURE_REGISTRY=$reg"
    echo "OAK_INSECURE_REGISTRIES=$reg"
    echo "FIXTURE_IMAGE=$reg/$REPO:latest"
    grep -q '^FIXTURE_DOCKER_MANIFEST_DIGEST=' "$dir/image/digests" && echo "FIXTURE_IMAGE_DOCKER=$reg/$REPO:docker"
    cat "$dir/image/digests"
    echo "FIXTURE_OCI_LAYOUT=$dir/image"
    echo "FIXTURE_RUNC_ROOT=$dir/runc"
    echo "FIXTURE_CONTAINERD_PID=$(cat "$dir/containerd.pid")"
    echo "FIXTURE_CONTAINERD=$(cat "$dir/containerd.bin")"
    # As the daemon reports it (its ctr: another release's would warn about the mismatch).
    echo "FIXTURE_CONTAINERD_VERSION=$(PATH=$(dirname "$(cat "$dir/containerd.bin")"):$PATH ctr -a "$dir/containerd.sock" version |
      awk '$1 == "Version:" {v = $2} END {print v}')"
    echo "FIXTURE_REGISTRY_PID=$(cat "$dir/registry.pid")"
    [ -z "$owner" ] || echo "FIXTURE_WATCHDOG_PID=$(cat "$dir/watchdog.pid")"
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
  trap - EXIT
  log "up in $((SECONDS - t0))s: $dir"
  cat "$dir/env"
}

# ---------------------------------------------------------------------------------------------
# down

# Mount points under <dir>, deepest first (mountinfo field 5, octal escapes decoded).
mounts_under() {
  local dir=$1
  awk '{print $5}' /proc/self/mountinfo | while read -r m; do
    m=$(printf '%b' "$m")
    case $m in "$dir" | "$dir"/*) echo "$m" ;; esac
  done | awk '{print length($0) " " $0}' | sort -rn | cut -d' ' -f2-
}

# Processes (other than this script and its ancestors) whose cmdline names <dir> and whose name is
# one of the parts the fixture or its clients run.
stray_pids() {
  local dir=$1 p comm skip=" $$ $PPID "
  for p in /proc/[0-9]*; do
    p=${p#/proc/}
    [[ $skip == *" $p "* ]] && continue
    comm=$(cat "/proc/$p/comm" 2>/dev/null) || continue
    case $comm in containerd | containerd-shim* | docker-registr* | registry | runc | ctr) ;; *) continue ;; esac
    [[ "$(cmdline "$p")" == *"$dir/"* ]] && echo "$p"
  done
}

cmd_down() {
  [ $# -eq 1 ] || usage
  local dir
  dir=$(abs_dir "$1")
  if [ ! -e "$dir" ]; then
    log "$dir does not exist: nothing to do"
    return 0
  fi
  [ -f "$dir/$MARKER" ] || die "$dir has no $MARKER: not a fixture dir, refusing to touch it"
  # One teardown at a time (Drop and the watchdog may race); a stale lock dies with its holder.
  exec 8<"$dir/$MARKER"
  flock -w 120 8 || die "another teardown of $dir holds the lock for 2 minutes"
  [ -f "$dir/$MARKER" ] || return 0

  local sock=$dir/containerd.sock pid ns id namespaces=""
  if [ -z "${OAK_FIXTURE_FROM_WATCHDOG:-}" ] && [ -f "$dir/watchdog.pid" ]; then
    pid=$(cat "$dir/watchdog.pid")
    pid_is_ours "$pid" "$dir" && [ "$pid" != "$PPID" ] && kill -KILL -- "-$pid" 2>/dev/null || true
  fi

  # 1. Tasks, through containerd while it answers: runc deletes their cgroups and mounts.
  pid=$(cat "$dir/containerd.pid" 2>/dev/null || true)
  if pid_is_ours "$pid" "$dir" && [ -S "$sock" ]; then
    for ns in $(timeout 5 ctr -a "$sock" namespaces ls -q 2>/dev/null || true); do
      namespaces+=" $ns"
      for id in $(timeout 5 ctr -a "$sock" -n "$ns" tasks ls -q 2>/dev/null || true); do
        timeout 10 ctr -a "$sock" -n "$ns" tasks delete --force "$id" >/dev/null 2>&1 || true
      done
    done
  fi
  # 2. containerd itself.
  pid_is_ours "$pid" "$dir" && kill_wait "$pid" 5

  # 3. What survived: per bundle (<state>/io.containerd.runtime.v2.task/<ns>/<id>) the runc
  #    container (only if its state points at our bundle), its cgroup's processes, its shim.
  local bundle shim_addr cg cgp h f rroot runc_dirs=""
  for bundle in "$dir"/containerd/state/io.containerd.runtime.v2.task/*/*; do
    [ -d "$bundle" ] || continue
    id=${bundle##*/}
    ns=${bundle%/*}
    ns=${ns##*/}
    namespaces+=" $ns"
    # The client may have chosen a runc root (runc options "root"); the shim appends the namespace.
    rroot=$(jq -r '.root // empty' "$bundle/options.json" 2>/dev/null || true)
    rroot=${rroot:-$RUNC_ROOT}/$ns
    runc_dirs+=" $rroot"
    if grep -qsF "\"rootfs\":\"$bundle/rootfs\"" "$rroot/$id/state.json"; then
      timeout 10 runc --root "$rroot" delete --force "$id" >/dev/null 2>&1 || true
      rm -rf "${rroot:?}/$id"
    fi
    # The client's cgroupsPath (a worker may nest it: /<ns>/<scope>/<id>); containerd's default otherwise.
    cgp=$(jq -r '.linux.cgroupsPath // empty' "$bundle/config.json" 2>/dev/null || true)
    cgp=${cgp#/}
    [[ $cgp == "$ns"/* && $cgp != *..* ]] || cgp=$ns/$id
    for cg in /sys/fs/cgroup/"$cgp" /sys/fs/cgroup/*/"$cgp"; do
      [ -f "$cg/cgroup.procs" ] || continue
      xargs -r kill -KILL <"$cg/cgroup.procs" 2>/dev/null || true
    done
    shim_addr=$(cat "$bundle/address" 2>/dev/null || true)
    shim_addr=${shim_addr#unix://}
    case $shim_addr in "$SHIM_SOCKET_DIR"/*) rm -f "$shim_addr" ;; esac
  done
  for ns in "$dir"/containerd/root/io.containerd.runtime.v2.task/*; do
    [ -d "$ns" ] && namespaces+=" ${ns##*/}"
  done
  # Shims of this containerd carry "-address <dir>/containerd.sock"; then any other part or
  # client (ctr, runc) still naming <dir>.
  for pid in $(stray_pids "$dir"); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  # 4. The registry.
  pid=$(cat "$dir/registry.pid" 2>/dev/null || true)
  pid_is_ours "$pid" "$dir" && kill_wait "$pid" 3
  local i
  for ((i = 0; i < 30; i++)); do
    [ -z "$(stray_pids "$dir")" ] && break
    sleep 0.1
  done

  for bundle in "$dir"/containerd/state/io.containerd.runtime.v2.task/*/*; do
    [ -d "$bundle" ] || continue
    id=${bundle##*/}
    # ctr's stdio fifos (<fifo dir>/<random>/<id>-std{in,out,err}); a client deletes them with
    # the task, which cannot happen once containerd is gone. Only dirs holding nothing but this
    # id's fifos, and which no process has open, are removed.
    for f in "$FIFO_DIR"/*/"$id"-stdout; do
      [ -p "$f" ] || continue
      f=${f%/*}
      [ -z "$(find "$f" -mindepth 1 ! -name "$id-stdin" ! -name "$id-stdout" ! -name "$id-stderr")" ] || continue
      fuser -s "$f"/* 2>/dev/null || rm -rf "$f"
    done
  done

  # 5. Cgroups left by our containers (v1: one tree per controller; v2: one tree), then their
  #    namespace parents if empty (runc recreates them on demand).
  for ns in $(printf '%s\n' $namespaces | sort -u); do
    for h in /sys/fs/cgroup /sys/fs/cgroup/*; do
      [ -d "$h/$ns" ] && [ -f "$h/$ns/cgroup.procs" ] || continue
      for cg in "$h/$ns"/*/ "$h/$ns"/*/*/; do
        cg=${cg%/}
        [ -d "$dir/containerd/state/io.containerd.runtime.v2.task/$ns/${cg##*/}" ] || continue
        # Killed processes leave the cgroup only once they have exited.
        for ((i = 0; i < 30; i++)); do
          [ -s "$cg/cgroup.procs" ] || break
          sleep 0.1
        done
        [ -f "$cg/cgroup.procs" ] && rmdir "$cg" 2>/dev/null || true
      done
      # Per-worker scopes (/<ns>/<scope>/<id>) left empty; a busy one refuses rmdir.
      for cg in "$h/$ns"/*/; do
        [ -f "$cg/cgroup.procs" ] && rmdir "${cg%/}" 2>/dev/null || true
      done
      rmdir "$h/$ns" 2>/dev/null || true
    done
  done

  # Per-namespace runc roots outside <dir> that our containers created, if now empty. (A
  # namespace's root is shared with other containerds; runc recreates it when needed.)
  for ns in $namespaces; do runc_dirs+=" $RUNC_ROOT/$ns"; done
  for rroot in $(printf '%s\n' $runc_dirs | sort -u); do
    case $rroot in "$dir"/*) ;; *) rmdir "$rroot" 2>/dev/null || true ;; esac
  done

  # 6. Mounts under <dir>, deepest first; lazy as the last resort.
  local m
  for ((i = 0; i < 3; i++)); do
    m=$(mounts_under "$dir")
    [ -n "$m" ] || break
    while read -r m; do
      umount "$m" 2>/dev/null || { [ "$i" -ge 1 ] && umount -l "$m" 2>/dev/null; } || true
    done <<<"$m"
  done

  # 7. Files. --one-file-system: never follow a mount that refused to go away.
  rm -rf --one-file-system "$dir" 2>/dev/null || true
  local left=""
  [ -z "$(stray_pids "$dir")" ] || left+=" processes: $(stray_pids "$dir" | tr '\n' ' ')"
  [ -z "$(mounts_under "$dir")" ] || left+=" mounts: $(mounts_under "$dir" | tr '\n' ' ')"
  [ ! -e "$dir" ] || left+=" files under $dir"
  [ -z "$left" ] || die "teardown of $dir left:$left"
  log "down: $dir removed"
}

case ${1:-} in
  up) need_root "$@"; shift; cmd_up "$@" ;;
  down) need_root "$@"; shift; cmd_down "$@" ;;
  __watchdog) shift; watchdog "$@" ;;
  *) usage ;;
esac
