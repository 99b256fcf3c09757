#!/usr/bin/env bash
# The main job: start a controller (store/ of this project) and two local agents, `computing-1`
# (web services; it also provides MySQL, Redis and nginx routing on this machine) and `daemons-1`,
# deploy the bundled example (examples/shop) for real through nginx, and leave it all running.
#   scripts/demo.sh start | stop
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
DEMO=$ROOT/.demo
STORE=$ROOT/store
LISTEN=${DEPLOYER_DEMO_LISTEN:-127.0.0.1:7710}
HTTP_PORT=${DEPLOYER_DEMO_HTTP_PORT:-80}
REPO=$DEMO/repos/shop.git
# Services run as their environment's own Unix user, which must be able to reach their folder:
# the standard root, not a folder inside this checkout (which may sit in a private home).
SRV=${DEPLOYER_DEMO_SERVICES_ROOT:-/srv/services}
export DEPLOYER_SOCKET=$STORE/control.sock
# This checkout's code, whichever checkout the virtualenv was installed from.
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# What this run started (pid files), so that a run that fails stops it again.
STARTED=()
on_exit() {
  local rc=$? pidfile
  [ $rc -ne 0 ] && [ ${#STARTED[@]} -gt 0 ] || return 0
  for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do
    pidfile=${STARTED[$i]}
    running "$pidfile" && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  echo "demo: failed (exit $rc); stopped what this run started (${#STARTED[@]} process(es)). Logs:" \
       "store/controller.log, .demo/*.log. Services deployed before keep running: make demo-stop stops them" >&2
}

start_bg() {  # pidfile logfile cmd…
  local pidfile=$1 logfile=$2; shift 2
  setsid "$@" </dev/null >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
  STARTED+=("$pidfile")
}

# A command on the environment, once no other job holds it: back after `make demo-stop`, the
# controller restarts the stopped services itself (a heal job), and an order meanwhile is told
# the environment is busy (exit 5).
when_free() {
  local tries=0 code
  while :; do
    "$@" && return 0
    code=$?
    [ "$code" -eq 5 ] && [ "$tries" -lt 60 ] || return "$code"
    tries=$((tries + 1))
    echo "demo: shop/$ENV is busy with another job: trying again in 2 s" >&2
    sleep 2
  done
}

wait_until() {  # seconds description cmd…
  local seconds=$1 what=$2; shift 2
  for _ in $(seq $((seconds * 10))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "demo: timed out waiting for $what" >&2
  return 1
}

agents_connected() {
  "$BIN/deployctl" agents --json | "$BIN/python" -c '
import json, sys
states = {a["id"]: a["state"] for a in json.load(sys.stdin)}
sys.exit(0 if all(states.get(a) == "connected" for a in ("computing-1", "daemons-1")) else 1)'
}

# The system's nginx, the one that reads /etc/nginx/conf.d: another nginx running on this machine
# (a test's own, say) is not it.
NGINX_PID=/run/nginx.pid
start_nginx() {
  local pidfile
  pidfile=$(nginx -T 2>/dev/null | sed -n 's/^[[:space:]]*pid[[:space:]]\{1,\}\([^;]*\);.*/\1/p' | head -n 1)
  pidfile=${pidfile:-/run/nginx.pid}
  NGINX_PID=$pidfile   # the agent reads it to know when a reload has taken effect
  if ! running "$pidfile"; then
    nginx
    STARTED+=("$pidfile")
    echo "demo: started nginx"
  fi
}

# This controller's mark on what it makes (controller/ownership.py).
owner_mark() {
  "$BIN/python" -c 'import sys
from common.tls import fingerprint
from controller.environments.ownership import owner_id, owner_mark
print(owner_mark(owner_id(fingerprint(open(sys.argv[1], "rb").read()))))' "$STORE/pki/ca.crt"
}

# Says what of shop/ENV on this machine belongs to another controller (an earlier store, another
# checkout's demo), if anything does. The deployer would refuse to take those over; the demo then
# deploys under the next name instead of touching them.
held_elsewhere() {  # ENV MARK
  local env=$1 mark=$2 user=auto-shop-$1 f
  "$BIN/deployctl" ledger "shop/$env" >/dev/null 2>&1 && return 1   # this controller's environment
  if getent passwd "$user" >/dev/null && [ "$(getent passwd "$user" | cut -d: -f5)" != "$mark" ]; then
    echo "Unix user $user"; return 0
  fi
  for f in "$SRV/auto-shop-$env-web" "$SRV/auto-shop-$env-worker"; do
    if [ -e "$f" ] && [ "$(cat "$f/.deployer-owner" 2>/dev/null)" != "$mark" ]; then echo "folder $f"; return 0; fi
  done
  f=/etc/nginx/conf.d/auto-shop-$env.conf
  if [ -e "$f" ] && [ "$(sed -n 2p "$f")" != "# owner: $mark" ]; then echo "nginx file $f"; return 0; fi
  return 1
}

choose_environment() {
  local mark what n=1
  mark=$(owner_mark)
  ENV=demo
  while what=$(held_elsewhere "$ENV" "$mark"); do
    echo "demo: shop/$ENV is another controller's here ($what is not this one's): left alone"
    n=$((n + 1)); ENV=demo$n
    if [ $n -gt 9 ]; then echo "demo: shop/demo to shop/demo9 are all taken by other controllers" >&2; return 1; fi
  done
  SPEC=examples/shop/environment.yml
  DOMAIN=shop.localhost
  if [ "$ENV" != demo ]; then
    DOMAIN=$ENV.shop.localhost
    SPEC=$DEMO/environment-$ENV.yml
    sed -e "s/^environment: demo\$/environment: $ENV/" -e "s/^domain: shop\.localhost\$/domain: $DOMAIN/" \
        -e "s#source: \.\./\.\./\.demo/repos/shop\.git#source: $REPO#" examples/shop/environment.yml >"$SPEC"
    echo "demo: deploying shop/$ENV at http://$DOMAIN/ instead"
  fi
}

# The example's code lives in this project; deploys take it from a git repository, as in real life.
publish_example() {
  local work=$DEMO/repos/shop-work
  [ -d "$REPO" ] || git init -q --bare -b main "$REPO"
  rm -rf "$work"
  git clone -q "$REPO" "$work" 2>/dev/null
  git -C "$work" checkout -q -B main
  (cd examples/shop && tar --exclude=node_modules --exclude=dist -cf - web worker) | (cd "$work" && tar -xf -)
  git -C "$work" add -A
  if ! git -C "$work" diff --cached --quiet; then
    git -C "$work" -c user.name=demo -c user.email=demo@localhost commit -q -m "shop example"
    git -C "$work" push -q origin main
    echo "demo: published examples/shop to $REPO"
  fi
  rm -rf "$work"
}

# An agent without a certificate enrols on its first start with a single-use token, passed in the
# environment (never on a command line other users can read).
# The token also grants what the agent provides ($3): its hello alone would not be believed.
enrolment() {
  if [ -f "$DEMO/agents/$1/tls/agent.crt" ]; then
    export DEPLOYER_TOKEN=
  else
    DEPLOYER_TOKEN=$("$BIN/deployctl" token create --role "$2" --agent "$1" --ttl 10m \
      ${3:+--provides "$3"} 2>/dev/null)
    export DEPLOYER_TOKEN
    echo "demo: enrolling $1 ($2) with a single-use token"
  fi
}

start() {
  trap on_exit EXIT
  mkdir -p "$DEMO"
  if running "$DEMO/controller.pid"; then
    echo "demo: controller already running (pid $(cat "$DEMO/controller.pid"))"
  else
    chmod 700 "$STORE"   # the controller refuses a store other users can read: it holds its CA key
    start_bg "$DEMO/controller.pid" "$DEMO/controller.out" \
      "$BIN/deployer-controller" --store "$STORE" --listen "$LISTEN" --log-file "$STORE/controller.log"
    wait_until 20 "the controller" "$BIN/deployctl" agents
    echo "demo: controller serving agents on $LISTEN, operators on store/control.sock"
  fi
  start_nginx
  if ! running "$DEMO/computing-1.pid"; then
    enrolment computing-1 computing mysql,redis,nginx
    start_bg "$DEMO/computing-1.pid" "$DEMO/computing-1.log" \
      "$BIN/deployer-agent" --id computing-1 --role computing --controller "$LISTEN" \
      --state-dir "$DEMO/agents/computing-1" --services-root "$SRV" \
      --provide mysql.host=127.0.0.1 --provide mysql.port=3306 \
      --provide redis.host=127.0.0.1 --provide redis.port=6379 \
      --provide nginx.conf_dir=/etc/nginx/conf.d --provide nginx.listen="$HTTP_PORT" \
      --provide nginx.pid="$NGINX_PID"
  fi
  if ! running "$DEMO/daemons-1.pid"; then
    enrolment daemons-1 daemons
    start_bg "$DEMO/daemons-1.pid" "$DEMO/daemons-1.log" \
      "$BIN/deployer-agent" --id daemons-1 --role daemons --controller "$LISTEN" \
      --state-dir "$DEMO/agents/daemons-1" --services-root "$SRV"
  fi
  wait_until 30 "both agents to connect" agents_connected
  # A demo enrolled before grants existed has none: grant what computing-1 provides (idempotent).
  "$BIN/deployctl" agents grant computing-1 --provides mysql,redis,nginx >/dev/null
  echo
  "$BIN/deployctl" agents
  echo
  publish_example
  choose_environment
  echo "\$ deployctl apply $SPEC"
  when_free "$BIN/deployctl" apply "$SPEC"
  if ! when_free "$BIN/deployctl" verify "shop/$ENV" >/dev/null 2>&1; then
    # Already deployed, but stopped by `make demo-stop`: bring what the ledger says back.
    echo
    echo "\$ deployctl repair shop/$ENV"
    when_free "$BIN/deployctl" repair "shop/$ENV"
  fi
  echo
  echo "\$ curl http://$DOMAIN:$HTTP_PORT/     (through nginx; reads MySQL and Redis)"
  curl -sS --fail --resolve "$DOMAIN:$HTTP_PORT:127.0.0.1" "http://$DOMAIN:$HTTP_PORT/"
  echo
  echo
  echo "\$ deployctl ledger shop/$ENV"
  "$BIN/deployctl" ledger "shop/$ENV"
  echo
  echo "\$ deployctl status shop/$ENV"
  "$BIN/deployctl" status "shop/$ENV" || true
  STARTED=()
  cat <<MSG

The example answers at http://$DOMAIN:$HTTP_PORT/ through nginx, and everything keeps running.
Try:
  .venv/bin/deployctl plan $SPEC     # nothing to do
  .venv/bin/deployctl exec --role daemons -- uptime
  make demo-stop
Logs: store/controller.log, .demo/computing-1.log, .demo/daemons-1.log, $SRV/*/logs/
MSG
}

stop() {
  local any=0 pid
  for state in "$DEMO"/agents/*/services/*.json; do  # the example's own processes
    [ -f "$state" ] || continue
    pid=$("$BIN/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$state")
    kill -- "-$pid" 2>/dev/null && echo "demo: stopped service $(basename "$state" .json)"
    rm -f "$state"
    any=1
  done
  for name in computing-1 daemons-1 controller; do
    if running "$DEMO/$name.pid"; then
      kill "$(cat "$DEMO/$name.pid")"
      for _ in $(seq 100); do running "$DEMO/$name.pid" || break; sleep 0.1; done
      echo "demo: stopped $name"
      any=1
    fi
    rm -f "$DEMO/$name.pid"
  done
  [ $any -eq 1 ] || echo "demo: nothing was running"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
