#!/usr/bin/env bash
# The 1-DOC demo (README "Main job"): root + cluster orchestrator (`orch-lite all`) and one
# worker on this machine, deploying the getting-started guide's `clientsrvr` application (an
# HTTP server behind the service IP 10.30.30.30 and a client fetching from it). There is no
# internet here, so both images are the fixture's busybox image from a private local registry,
# run by a private containerd; everything lives under $OAK_DEMO_DIR (default /tmp/oak-1doc).
#
#   sudo scripts/1-doc.sh          set up, build, start, deploy, show; Ctrl-C stops everything
#   sudo scripts/1-doc.sh stop     stop a demo started elsewhere and remove everything it made
#
# The worker runs with the overlay on (OAK_NETWORK=auto): the client reaches the server through
# the service IP 10.30.30.30. `OAK_NETWORK=off sudo scripts/1-doc.sh` runs it without.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${OAK_DEMO_DIR:-/tmp/oak-1doc}
ROOT_API=127.0.0.1:10000
CLUSTER_API=127.0.0.1:10100
STATUS_ADDR=127.0.0.1:10190
MQTT_PORT=10003
NS=oakestra
APP=clientsrvr

log() { printf '\033[1m[1-doc]\033[0m %s\n' "$*"; }
die() { printf '[1-doc] error: %s\n' "$*" >&2; exit 1; }

# Pids of the instances' processes (containerd's tasks), to check they are gone after the stop.
task_pids() {
  local sock=$DIR/infra/containerd.sock
  [ -S "$sock" ] || return 0
  timeout 5 ctr -a "$sock" -n "$NS" tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING" { print $2 }' || true
}

# What of the demo is still there: processes naming $DIR, mounts under it, the directory,
# instance processes. Prints one line per leftover.
leftovers() {
  local p cmd pid
  for p in /proc/[0-9]*; do
    case ${p#/proc/} in "$$" | "$BASHPID") continue ;; esac
    cmd=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) || continue
    case " $cmd" in *" $DIR"/* | *"=$DIR"/* | *" $DIR "*) echo "process ${p#/proc/}: $cmd" ;; esac
  done
  awk -v d="$DIR" '$5 == d || index($5, d "/") == 1 { print "mount " $5 }' /proc/self/mountinfo
  [ ! -e "$DIR" ] || echo "directory $DIR"
  for pid in $1; do
    [ ! -d "/proc/$pid" ] || echo "instance process $pid: $(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
  done
}

stop() {
  local pid name instances left
  instances=$(task_pids | tr '\n' ' ')
  # The worker first: it must not see its containers vanish and report them DEAD to a cluster
  # that is going away anyway.
  for name in worker orch-lite; do
    pid=$(cat "$DIR/$name.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/$name.pid"
  done
  # The instances outlive the worker by design (a restarted worker adopts them); the fixture
  # removes containerd, its containers, mounts and the registry.
  [ ! -d "$DIR/infra" ] || "$REPO/scripts/fixture.sh" down "$DIR/infra"
  # A stopped worker leaves running instances wired for its next start; their containers are
  # gone now, so their namespaces (and with them the veths) and the bridge go too.
  for ns in /run/netns/"$APP".*; do
    [ ! -e "$ns" ] || ip netns del "${ns##*/}" 2>/dev/null || true
  done
  ip link del goProxyBridge 2>/dev/null || true
  # ...and the outgoing-NAT table the worker keeps for its running instances.
  ! command -v nft >/dev/null || nft delete table ip oakestra 2>/dev/null || true
  rm -rf "$DIR"
  left=$(leftovers "$instances")
  if [ -n "$left" ]; then
    printf '%s\n' "$left" >&2
    die "stopped, but the lines above are left over"
  fi
  log "stopped; nothing left: no instances, processes, mounts or files under $DIR"
}

[ "$(id -u)" = 0 ] || die "run as root: sudo $0 $*"
case ${1:-start} in
  stop) stop; exit 0 ;;
  start) ;;
  *) die "usage: $0 [start|stop]" ;;
esac
[ ! -e "$DIR" ] || die "$DIR exists: a demo is running (stop it with: sudo $0 stop)"
for port in ${ROOT_API##*:} ${CLUSTER_API##*:} $MQTT_PORT ${STATUS_ADDR##*:}; do
  if ss -Htln "sport = :$port" 2>/dev/null | grep -q .; then
    die "port $port is in use (another orchestrator or worker?): the demo needs 10000, 10100, 10003 and 10190"
  fi
done

log "installing what is missing (scripts/setup-deps.sh)"
bash "$REPO/scripts/setup-deps.sh"
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
log "building (cargo build --release)"
(cd "$REPO" && cargo build --release --locked -q)

mkdir -p "$DIR"
trap 'echo; stop; exit 0' INT TERM
on_exit() {
  local rc=$?
  [ "$rc" = 0 ] || { echo; log "failed (exit $rc), cleaning up"; stop; }
}
trap on_exit EXIT

# wait_until <seconds> <what> <command…>: polls the command every 0.5 s until it succeeds; exit
# status 2 means "will not happen" and ends the wait with the command's stderr.
wait_until() {
  local secs=$1 what=$2 i rc
  shift 2
  for ((i = 0; i < secs * 2; i++)); do
    if "$@" >/dev/null 2>"$DIR/wait.err"; then return 0; else rc=$?; fi
    [ "$rc" != 2 ] || die "$what: $(cat "$DIR/wait.err")"
    sleep 0.5
  done
  die "$what: nothing after $secs s (logs: $DIR/orch-lite.log, $DIR/worker.log)"
}

# api <method> <path> [<json body>]: the root API with the session's token; prints the body,
# fails on a non-2xx answer with the server's message.
api() {
  local out code args=(-sS -X "$1" -H 'Content-Type: application/json' -w '\n%{http_code}')
  [ -z "${TOKEN:-}" ] || args+=(-H "Authorization: Bearer $TOKEN")
  [ $# -lt 3 ] || args+=(--data "$3")
  out=$(curl "${args[@]}" "http://$ROOT_API$2") || return 1
  code=${out##*$'\n'}
  out=${out%$'\n'*}
  case $code in
    2*) printf '%s\n' "$out" ;;
    *) echo "$1 $2 answered $code: $out" >&2; return 1 ;;
  esac
}

log "starting a private containerd and registry with the demo image"
"$REPO/scripts/fixture.sh" up "$DIR/infra" >/dev/null
set -a
# shellcheck disable=SC1091
. "$DIR/infra/env"
set +a

log "starting orch-lite all (root :10000, cluster :10100, MQTT :10003)"
OAK_DATA_DIR="$DIR/orch-lite" "$REPO/target/release/orch-lite" all >"$DIR/orch-lite.log" 2>&1 &
echo $! >"$DIR/orch-lite.pid"
LOGIN='{"username":"Admin","password":"Admin"}'
wait_until 20 "the root API on $ROOT_API" api POST /api/auth/login "$LOGIN"

log "starting the worker (NodeEngine -a 127.0.0.1 -p 10100)"
# The overlay runs inside the worker (bridge goProxyBridge, TUN goProxyTun, tunnel UDP 50103).
OAK_CONFIG_DIR="$DIR/worker/etc" OAK_NETCFG="$DIR/worker/etc/netcfg.json" \
  OAK_STATE_DIR="$DIR/worker/state" OAK_APP_LOGS="$DIR/worker/logs" \
  OAK_STATUS_ADDR=$STATUS_ADDR OAK_NETWORK=${OAK_NETWORK:-auto} \
  "$REPO/target/release/NodeEngine" -a 127.0.0.1 -p 10100 >"$DIR/worker.log" 2>&1 &
echo $! >"$DIR/worker.pid"
cluster_has_worker() {
  curl -sf "http://$CLUSTER_API/api/cluster/status" | jq -e '.nodes | any(.active)'
}
wait_until 30 "the worker registering with the cluster" cluster_has_worker
curl -sf "http://$CLUSTER_API/api/cluster/status" |
  jq -r '.nodes[] | "  cluster sees worker \(.name) (\(.id)): \(.vcpus) vcpus, \(.memory) MiB, \(.architecture), \(.virtualization | join(","))"'

TOKEN=$(api POST /api/auth/login "$LOGIN" | jq -r .token)
root_has_worker() {
  api GET /api/clusters/active | jq -e 'any(.[]; .active_nodes >= 1)'
}
log "logged in as Admin; waiting for the cluster's next report to the root (every 15 s)"
wait_until 40 "the root seeing the worker" root_has_worker

SLA=$(cat <<EOF
{
  "sla_version": "v2.0",
  "customerID": "Admin",
  "applications": [{
    "applicationID": "",
    "application_name": "$APP",
    "application_namespace": "test",
    "application_desc": "HTTP server behind 10.30.30.30 and a client fetching from it",
    "microservices": [
      {
        "microserviceID": "",
        "microservice_name": "server",
        "microservice_namespace": "test",
        "virtualization": "container",
        "cmd": ["httpd", "-f", "-p", "80", "-h", "/www"],
        "memory": 100, "vcpus": 1, "vgpus": 0, "vtpus": 0,
        "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
        "code": "$FIXTURE_IMAGE",
        "state": "",
        "port": "6080:80/tcp",
        "addresses": {"rr_ip": "10.30.30.30"},
        "added_files": []
      },
      {
        "microserviceID": "",
        "microservice_name": "client",
        "microservice_namespace": "test",
        "virtualization": "container",
        "cmd": ["sh", "-c", "while true; do wget -q -O - http://10.30.30.30/ || true; sleep 2; done"],
        "memory": 100, "vcpus": 1, "vgpus": 0, "vtpus": 0,
        "bandwidth_in": 0, "bandwidth_out": 0, "storage": 0,
        "code": "$FIXTURE_IMAGE",
        "state": "",
        "port": "",
        "added_files": [],
        "constraints": []
      }
    ]
  }]
}
EOF
)
log "creating the application (POST /api/application/) with this SLA:"
printf '%s\n' "$SLA" | sed 's/^/    /'
APP_ID=$(api POST /api/application/ "$SLA" | jq -r --arg app "$APP" '.[] | select(.application_name == $app) | .applicationID')
SERVICES=$(api GET "/api/services/$APP_ID")
SERVER_ID=$(jq -r '.[] | select(.microservice_name == "server") | ._id."$oid"' <<<"$SERVICES")
CLIENT_ID=$(jq -r '.[] | select(.microservice_name == "client") | ._id."$oid"' <<<"$SERVICES")
SERVER=$(jq -r '.[] | select(.microservice_name == "server") | .job_name' <<<"$SERVICES").instance.0
CLIENT=$(jq -r '.[] | select(.microservice_name == "client") | .job_name' <<<"$SERVICES").instance.0
log "application $APP_ID: services server ($SERVER_ID) and client ($CLIENT_ID)"

log "deploying one instance of each (POST /api/service/<id>/instance)"
api POST "/api/service/$SERVER_ID/instance" >/dev/null
api POST "/api/service/$CLIENT_ID/instance" >/dev/null
both_running() {
  local s
  for s in "$SERVER_ID" "$CLIENT_ID"; do
    s=$(api GET "/api/service/$s" | jq -r '.instance_list[0].status // "-"')
    case $s in
      RUNNING) ;;
      FAILED | DEAD)
        api GET "/api/services/$APP_ID" | jq -c '.[].instance_list[] | {instance_number, status, status_detail}' >&2
        return 2
        ;;
      *) return 1 ;;
    esac
  done
}
SECONDS=0
wait_until 90 "both instances RUNNING" both_running
log "both RUNNING after ${SECONDS} s (image pull included); the root says (GET /api/services/$APP_ID):"
api GET "/api/services/$APP_ID" | jq -r '
  ["SERVICE", "INSTANCE", "STATUS", "WORKER", "HOST", "CPU%", "MEM%"],
  (.[] | .job_name as $j | .instance_list[] |
    [$j, (.instance_number | tostring), .status, .worker_id, .host_ip,
     (.cpu_percent // "-" | tostring), (.memory_percent // "-" | tostring)])
  | @tsv' | while IFS=$'\t' read -r a b c d e f g; do
    printf '    %-30s %-8s %-8s %-24s %-15s %-6s %s\n' "$a" "$b" "$c" "$d" "$e" "$f" "$g"
  done
CTR=(ctr -a "$OAK_CONTAINERD_SOCKET" -n "$NS")
log "in containerd (ctr -a $OAK_CONTAINERD_SOCKET -n $NS tasks ls):"
"${CTR[@]}" tasks ls | sed 's/^/    /'

log "the server answers inside its own network namespace (ctr tasks exec … wget http://127.0.0.1/):"
if PAGE=$("${CTR[@]}" tasks exec --exec-id "demo-$$" "$SERVER" wget -q -O - http://127.0.0.1/ 2>&1); then
  printf '%s\n' "$PAGE" | sed 's/^/    /'
else
  log "the server did not answer: $PAGE"
fi
log "the client fetches http://10.30.30.30/ every 2 s; its log ($DIR/worker/logs/$CLIENT):"
fetched() { grep -qs OAK_FIXTURE_HTTPD_OK "$DIR/worker/logs/$CLIENT" && return 0; return 1; }
if [ "${OAK_NETWORK:-auto}" = off ]; then
  log "OAK_NETWORK=off: no overlay, so the client cannot reach 10.30.30.30"
elif wait_until 30 "the client's fetch from 10.30.30.30 through the overlay" fetched; then
  tail -n 3 "$DIR/worker/logs/$CLIENT" | sed 's/^/    /'
  log "the client reached the server through the service IP 10.30.30.30 (overlay)"
fi

log "everything is running; look around:"
cat <<EOF
  worker status:     curl -s http://$STATUS_ADDR/status | jq     (and /metrics)
  cluster status:    curl -s http://$CLUSTER_API/api/cluster/status | jq
  root API:          TOKEN=\$(curl -s -X POST http://$ROOT_API/api/auth/login -d '$LOGIN' | jq -r .token)
                     curl -s -H "Authorization: Bearer \$TOKEN" http://$ROOT_API/api/services/$APP_ID | jq
  undeploy:          curl -s -X DELETE -H "Authorization: Bearer \$TOKEN" http://$ROOT_API/api/service/$CLIENT_ID/instance/0
  containers:        ${CTR[*]} tasks ls
  instance logs:     tail -f $DIR/worker/logs/$SERVER $DIR/worker/logs/$CLIENT
  daemon logs:       tail -f $DIR/orch-lite.log $DIR/worker.log
  stop:              Ctrl-C here, or: sudo $0 stop
EOF
wait
