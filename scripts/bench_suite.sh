#!/usr/bin/env bash
# A throw-away suite for `fairlane bench`: auth, queue and worker replicas (one each, or
# BENCH_QUEUES and BENCH_WORKERS of the queue and the worker) against the local PostgreSQL
# and RabbitMQ, in a schema and a vhost of its own.
#
#   scripts/bench_suite.sh up              start it (state in $BENCH_STATE, default /tmp/fairlane-bench-suite)
#   scripts/bench_suite.sh bench ARGS...   run `fairlane bench ARGS` against it (targets,
#                                          request-log check, --pids and --metrics filled in)
#   scripts/bench_suite.sh pids            print "auth=PID queue=PID worker=PID ..." (replicas
#                                          after the first are queue2, worker2, worker3, ...)
#   scripts/bench_suite.sh restart NAME... stop and start these services again (after a code
#                                          change), keeping the schema, vhost and users
#   scripts/bench_suite.sh down            stop it, drop the schema, delete the vhost
#   scripts/bench_suite.sh run ARGS...     up, bench ARGS, down
#   scripts/bench_suite.sh profile SECONDS [DIR]
#                                          py-spy record (raw, 50 Hz) of queue and worker at
#                                          once, while a bench runs in another shell; prints
#                                          the top entries (self and inclusive) of each
#   scripts/bench_suite.sh top FILE.raw [N] the same summary for any py-spy raw profile
#
# FAIRLANE_SRC picks the source tree the services run from (default: this repository), so
# a baseline can be measured from a `git worktree` of another commit with the same bench.
#
# FAIRLANE_TEST_DATABASE_URL and FAIRLANE_TEST_BROKER_ROOT (the database URL without a
# schema, the broker URL without a vhost) pick the servers, read from the environment by
# every command: suite.env holds the schema, vhost and ports only, and editing its URLs has
# no effect. A fault drill points the services at a proxy with `restart NAME...` under
# these variables, and runs `down` without them, so the schema and the vhost are dropped
# on the servers directly.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${FAIRLANE_SRC:-$ROOT}"
PY="${BENCH_PYTHON:-$ROOT/.venv/bin/python}"
STATE="${BENCH_STATE:-${TMPDIR:-/tmp}/fairlane-bench-suite}"
BASE_PORT="${BENCH_BASE_PORT:-56051}"
DB_ROOT="${FAIRLANE_TEST_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/test}"
BROKER_ROOT="${FAIRLANE_TEST_BROKER_ROOT:-amqp://guest:guest@127.0.0.1:5672/}"

service_env() {  # the environment every service (and migrate) runs with
  # shellcheck disable=SC1091
  source "$STATE/suite.env"
  export PYTHONPATH="$SRC/clients:$SRC"
  export FAIRLANE_DATABASE_URL="$DB_ROOT" FAIRLANE_DATABASE_SCHEMA="$SCHEMA"
  export FAIRLANE_BROKER_URL="$BROKER_ROOT$VHOST" FAIRLANE_SERVICE_SECRET="bench-service-secret"
  export FAIRLANE_AUTH_LISTEN="127.0.0.1:$AUTH_PORT" FAIRLANE_AUTH_TARGET="127.0.0.1:$AUTH_PORT"
  # Workers (and the bench) use every queue replica, round robin.
  FAIRLANE_QUEUE_TARGET="$(for n in $(replicas queue); do printf '127.0.0.1:%s,' "$(port_of "$n")"; done)"
  export FAIRLANE_QUEUE_TARGET="${FAIRLANE_QUEUE_TARGET%,}"
  export FAIRLANE_AUTH_METRICS_PORT=0
  export FAIRLANE_GRACE_SECONDS=5
  # The bench registers up to thousands of users from this one address.
  export FAIRLANE_REGISTER_PEER_FREE=1000000
  # scripts/auth_bench.py plays callers at many addresses through x-forwarded-for.
  export FAIRLANE_TRUSTED_PROXIES='["127.0.0.1/32"]'
}

replicas() {  # queue|worker: the replicas' names, "queue queue2 ..."
  local count=1 i
  case $1 in queue) count="${QUEUES:-1}" ;; worker) count="${WORKERS:-1}" ;; esac
  for i in $(seq "$count"); do
    if [ "$i" = 1 ]; then printf '%s ' "$1"; else printf '%s%s ' "$1" "$i"; fi
  done
}

names() { echo "auth $(replicas queue)$(replicas worker)"; }

port_of() {  # name: its gRPC port (the first replicas keep the ports they always had)
  case $1 in
    auth) echo "$AUTH_PORT" ;;
    queue) echo "$QUEUE_PORT" ;;
    worker) echo "$WORKER_PORT" ;;
    queue*) echo $((BASE_PORT + 10 + ${1#queue})) ;;
    worker*) echo $((BASE_PORT + 20 + ${1#worker})) ;;
  esac
}

metrics_port_of() {  # name: its Prometheus port (0: none)
  case $1 in
    auth) echo 0 ;;
    queue) echo "$QUEUE_METRICS_PORT" ;;
    worker) echo "$WORKER_METRICS_PORT" ;;
    queue*) echo $((BASE_PORT + 30 + ${1#queue})) ;;
    worker*) echo $((BASE_PORT + 40 + ${1#worker})) ;;
  esac
}

start_service() {  # name: start it in the background and wait until it serves
  local name="$1" service="${1%%[0-9]*}" port metrics
  port="$(port_of "$name")"
  metrics="$(metrics_port_of "$name")"
  (
    cd "$SRC"
    upper="$(echo "$service" | tr '[:lower:]' '[:upper:]')"
    export "FAIRLANE_${upper}_LISTEN=127.0.0.1:$port" "FAIRLANE_${upper}_METRICS_PORT=$metrics"
    exec "$PY" -m fairlane.cli.main serve "$service"
  ) >>"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
  wait_serving "$port" "$name"
}

wait_serving() {  # port name
  "$PY" - "$1" "$2" <<'EOF'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

port, name = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.2)
sys.exit(f"{name} not SERVING on {port} after 60 s")
EOF
}

rabbitmq_fd_check() {  # warns when a local RabbitMQ cannot open a file per lane
  local pid limit
  pid="$(pgrep -f 'beam.smp.*rabbit' | head -1 || true)"
  [ -n "$pid" ] && [ -r "/proc/$pid/limits" ] || return 0
  limit="$(awk '/^Max open files/ {print $4}' "/proc/$pid/limits")"
  if [ -n "$limit" ] && [ "$limit" != unlimited ] && [ "$limit" -lt 20000 ]; then
    echo "warning: RabbitMQ may open only $limit files: runs with more than about" \
      "$((limit - 100)) lanes crash lane queues (emfile); see docs/deploy.md, Scaling" >&2
  fi
}

up() {
  if [ -f "$STATE/suite.env" ]; then
    echo "a bench suite is already up ($STATE); run '$0 down' first" >&2
    exit 1
  fi
  "$ROOT/scripts/ensure_services.sh" >/dev/null
  rabbitmq_fd_check
  mkdir -p "$STATE"
  local tag
  tag="bench_$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  cat >"$STATE/suite.env" <<EOF
SCHEMA=$tag
VHOST=$tag
QUEUES=${BENCH_QUEUES:-1}
WORKERS=${BENCH_WORKERS:-1}
BASE_PORT=$BASE_PORT
AUTH_PORT=$BASE_PORT
QUEUE_PORT=$((BASE_PORT + 1))
WORKER_PORT=$((BASE_PORT + 2))
QUEUE_METRICS_PORT=$((BASE_PORT + 3))
WORKER_METRICS_PORT=$((BASE_PORT + 4))
EOF
  service_env
  rabbitmqctl -q add_vhost "$VHOST"
  rabbitmqctl -q set_permissions -p "$VHOST" guest ".*" ".*" ".*"
  (cd "$SRC" && "$PY" -m fairlane.cli.main migrate)
  for name in $(names); do
    : >"$STATE/$name.log"
    start_service "$name"
  done
  echo "bench suite up: schema/vhost $SCHEMA, $(for n in $(names); do printf '%s :%s, ' "$n" "$(port_of "$n")"; done | sed 's/, $//')"
  pids
}

stop_service() {  # name: SIGTERM, then SIGKILL after 20 s; returns 1 if it had to kill
  local pid
  pid="$(cat "$STATE/$1.pid" 2>/dev/null || true)"
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "$1 ($pid) did not stop in 20 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null || true
  return 1
}

restart() {
  [ -f "$STATE/suite.env" ] || { echo "no bench suite is up ($STATE)" >&2; exit 1; }
  service_env
  for name in "$@"; do
    stop_service "$name" || true
    start_service "$name"
  done
  pids
}

pids() {
  local out=""
  # The replicas' count is the suite's (suite.env), not this shell's BENCH_QUEUES/WORKERS.
  # shellcheck disable=SC1091
  source "$STATE/suite.env"
  for name in $(names); do out+="$name=$(cat "$STATE/$name.pid") "; done
  echo "${out% }"
}

bench() {
  service_env
  local pid_list metrics=""
  pid_list="$(for n in $(names); do cat "$STATE/$n.pid"; done | paste -sd,)"
  for n in $(replicas queue)$(replicas worker); do
    metrics+="http://127.0.0.1:$(metrics_port_of "$n")/metrics,"
  done
  PYTHONPATH="$ROOT/clients:$ROOT" "$PY" -m fairlane.cli.main bench \
    --target "$FAIRLANE_QUEUE_TARGET" --auth-target "127.0.0.1:$AUTH_PORT" \
    --pids "$pid_list" --database-url "$DB_ROOT" --database-schema "$SCHEMA" \
    --metrics "${metrics%,}" \
    "$@"
}

top() {  # file.raw [entries]: summary of a py-spy --format raw (collapsed stacks) profile
  "$PY" - "$1" "${2:-15}" <<'PYTHON'
import re
import sys
from collections import Counter

path, top = sys.argv[1], int(sys.argv[2])
RUNNER = ("runpy", "typer", "fairlane/cli", "services/cli.py", "services/core/runtime.py",
          "uvloop/__init__", "asyncio/runners", "click", "threading.py")


def name(frame: str) -> str:  # "fn (file:line)" -> "fn (file)"
    return re.sub(r":\d+\)$", ")", frame)


leaf, incl, total = Counter(), Counter(), 0
for line in open(path):
    if not line.strip():
        continue
    stack, n = line.rstrip("\n").rsplit(" ", 1)
    frames = [name(f) for f in stack.split(";")]
    total += int(n)
    leaf[frames[-1]] += int(n)
    for f in set(frames):
        incl[f] += int(n)
print(f"{path}: {total} samples")
print("  (leaf 'Runner.run (asyncio/runners.py)': native code under the event loop, i.e.")
print("   uvloop and grpc core; 'Thread.run': native threads such as grpc's poller)")
print("  self (leaf):")
for f, n in leaf.most_common(top):
    print(f"    {100 * n / total:5.1f}%  {f}")
print("  inclusive:")
for f, n in [(f, n) for f, n in incl.most_common() if not any(r in f for r in RUNNER)][:top]:
    print(f"    {100 * n / total:5.1f}%  {f}")
PYTHON
}

profile() {  # seconds [dir]: py-spy record queue and worker at once, then summarise
  local seconds="${1:-15}" dir="${2:-$STATE/profile}"
  mkdir -p "$dir"
  for name in queue worker; do
    "$ROOT/.venv/bin/py-spy" record --pid "$(cat "$STATE/$name.pid")" --rate 50 \
      --duration "$seconds" --format raw -o "$dir/$name.raw" >"$dir/$name.py-spy.log" 2>&1 &
  done
  wait
  for name in queue worker; do top "$dir/$name.raw"; done
}

down() {
  [ -f "$STATE/suite.env" ] || { echo "no bench suite is up ($STATE)"; return 0; }
  service_env
  local code=0
  for name in $(replicas worker)$(replicas queue)auth; do
    local pid
    pid="$(cat "$STATE/$name.pid" 2>/dev/null || true)"
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$name ($pid) did not stop in 20 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      code=1
    fi
  done
  "$PY" -c 'import asyncio, sys; from fairlane_server.core.db import drop_schema
asyncio.run(drop_schema(sys.argv[1], sys.argv[2]))' "$DB_ROOT" "$SCHEMA"
  rabbitmqctl -q delete_vhost "$VHOST" || true
  rm -f "$STATE/suite.env" "$STATE"/*.pid
  echo "bench suite down (logs kept in $STATE)"
  return $code
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  restart) shift; restart "$@" ;;
  pids) pids ;;
  bench) shift; bench "$@" ;;
  profile) shift; profile "$@" ;;
  top) shift; top "$@" ;;
  run)
    shift
    up
    trap down EXIT
    bench "$@"
    ;;
  *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
