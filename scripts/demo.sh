#!/usr/bin/env bash
# The main job: start a controller (store/ of this project) and two local agents, `computing-1`
# and `daemons-1`, run a command across the fleet, and leave them running.
#   scripts/demo.sh start | stop | status
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/.venv/bin
DEMO=$ROOT/.demo
STORE=$ROOT/store
LISTEN=${DEPLOYER_DEMO_LISTEN:-127.0.0.1:7710}
export DEPLOYER_SOCKET=$STORE/control.sock

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_bg() {  # pidfile logfile cmd…
  local pidfile=$1 logfile=$2; shift 2
  setsid "$@" </dev/null >>"$logfile" 2>&1 &
  echo $! >"$pidfile"
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

start() {
  mkdir -p "$DEMO"
  if running "$DEMO/controller.pid"; then
    echo "demo: controller already running (pid $(cat "$DEMO/controller.pid"))"
  else
    start_bg "$DEMO/controller.pid" "$DEMO/controller.out" \
      "$BIN/deployer-controller" --store "$STORE" --listen "$LISTEN" --log-file "$STORE/controller.log"
    wait_until 20 "the controller socket" test -S "$DEPLOYER_SOCKET"
    echo "demo: controller serving agents on $LISTEN, operators on store/control.sock"
  fi
  for spec in computing-1:computing daemons-1:daemons; do
    id=${spec%%:*} role=${spec##*:}
    if running "$DEMO/$id.pid"; then
      echo "demo: agent $id already running"
      continue
    fi
    start_bg "$DEMO/$id.pid" "$DEMO/$id.log" \
      "$BIN/deployer-agent" --id "$id" --role "$role" --controller "$LISTEN" \
      --state-dir "$DEMO/agents/$id" --services-root "$DEMO/srv"
  done
  wait_until 30 "both agents to connect" agents_connected
  echo
  "$BIN/deployctl" agents
  echo
  echo '$ deployctl exec --all -- sh -c '\''for i in 1 2 3; do echo "$i on $(hostname)"; sleep 1; done'\'''
  "$BIN/deployctl" exec --all -- sh -c 'for i in 1 2 3; do echo "$i on $(hostname)"; sleep 1; done'
  cat <<MSG

The controller and both agents are still running. Try:
  .venv/bin/deployctl agents
  .venv/bin/deployctl exec --role daemons -- uptime
  make demo-stop
Logs: store/controller.log, .demo/computing-1.log, .demo/daemons-1.log
MSG
}

stop() {
  local any=0
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
