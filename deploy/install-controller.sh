#!/usr/bin/env bash
# Install (or upgrade) the deployer controller on this server. Run as root.
# See usage() below, or run with --help.
set -euo pipefail

PROG=$(basename "$0")
DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source-path=SCRIPTDIR source=install-lib.sh
. "$DEPLOY_DIR/install-lib.sh"

readonly UNIT=deployer-controller.service
readonly ENV_FILE=$CONFIG_DIR/controller.env
readonly SETTINGS_FILE=$CONFIG_DIR/controller.yml
readonly SERVICE_USER=deployer
# Must match StateDirectory=/RuntimeDirectory= and ExecStart= in the unit.
readonly STATE_DIR=/var/lib/deployer
readonly STORE_DIR=$STATE_DIR/store
readonly RUN_DIR=/run/deployer
readonly SOCKET=$RUN_DIR/control.sock

usage() {
    cat <<EOF
Usage: $PROG [--listen HOST:PORT] [--operator-listen HOST:PORT]
             [--source DIR] [--prefix DIR] [--python PATH] [--print-config]

Install or upgrade the deployer controller on this server (run as root):
  - installs python3-venv with apt-get if it is missing,
  - creates the virtualenv PREFIX/.venv and pip-installs deployer from SOURCE,
  - creates the system user and group "$SERVICE_USER" and its directories
    $STATE_DIR and $STORE_DIR (owned by $SERVICE_USER, mode 0700),
  - writes $ENV_FILE (mode 0640, listen addresses) unless it already
    exists (an existing file is never overwritten, even if other values are
    given),
  - writes $SETTINGS_FILE (root:$SERVICE_USER, 0640: job retention and
    notification webhooks, all at their defaults) unless it already exists,
  - installs $UNIT into $UNIT_DIR,
  - if systemd runs this machine: enables the controller and (re)starts it;
    otherwise prints the command that starts it by hand.
Running it again upgrades the code and restarts the controller.

Operators talk to the controller on the Unix socket $SOCKET (mode
0600), so deployctl runs as root or as the $SERVICE_USER user, e.g.
  sudo -u $SERVICE_USER PREFIX/.venv/bin/deployctl --socket $SOCKET ...
or over TCP (TLS, with a token from deployctl operator-token create) if
--operator-listen is given.

Options:
  --listen HOST:PORT           where agents connect (default: 127.0.0.1:7710,
                               this machine only; agents on other servers need
                               an address they can reach, e.g. 0.0.0.0:7710;
                               they enrol on the next port, 7711: open both)
  --operator-listen HOST:PORT  also serve operators over TCP, TLS and operator
                               tokens only (default: off)
  --source DIR                 deployer source tree to install
                               (default: $(dirname "$DEPLOY_DIR"))
  --prefix DIR                 install location, the venv goes to DIR/.venv
                               (default: /opt/deployer)
  --python PATH                interpreter for the venv, Python >= 3.11
                               (default: /usr/bin/python3)
  --print-config               print the controller.env this would write, and
                               exit (changes nothing, needs no root)
  -h, --help                   show this help

Example:
  sudo $DEPLOY_DIR/$PROG --listen 0.0.0.0:7710
EOF
}

listen='' operator_listen='' source_dir='' prefix=/opt/deployer print_config=0
PYTHON=''

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --listen) need_value "$1" $# && listen=$2 && shift ;;
        --listen=*) listen=${1#*=} ;;
        --operator-listen) need_value "$1" $# && operator_listen=$2 && shift ;;
        --operator-listen=*) operator_listen=${1#*=} ;;
        --source) need_value "$1" $# && source_dir=$2 && shift ;;
        --source=*) source_dir=${1#*=} ;;
        --prefix) need_value "$1" $# && prefix=$2 && shift ;;
        --prefix=*) prefix=${1#*=} ;;
        --python) need_value "$1" $# && PYTHON=$2 && shift ;;
        --python=*) PYTHON=${1#*=} ;;
        --print-config) print_config=1 ;;
        *) usage_error "unknown argument: $1" ;;
    esac
    shift
done

# --- Check the command line before touching anything ------------------------
listen_given=$listen
listen=${listen:-127.0.0.1:7710}
for pair in "--listen:$listen" "--operator-listen:$operator_listen"; do
    option=${pair%%:*} value=${pair#*:}
    [ -n "$value" ] || continue
    is_hostport "$value" || usage_error "$option must be HOST:PORT (IPv6 as [ADDR]:PORT): $value"
    # The unit grants no capabilities, so no CAP_NET_BIND_SERVICE.
    [ "$(port_of "$value")" -ge 1024 ] ||
        usage_error "$option: ports below 1024 need privileges the controller does not have: $value"
done
source_dir=${source_dir:-$(dirname "$DEPLOY_DIR")}
prefix=${prefix%/}
check_prefix "$prefix"

# render_env: controller.env for the values given (systemd EnvironmentFile=
# syntax; the unit holds the defaults and how they are used).
render_env() {
    printf '# deployer controller settings, read by %s.\n' "$UNIT"
    printf '# Written by %s, which never overwrites this file: edit it,\n' "$PROG"
    printf '# then run "systemctl restart deployer-controller".\n'
    printf '# Where agents connect (HOST:PORT).\n'
    printf 'DEPLOYER_CONTROLLER_LISTEN=%s\n' "$listen"
    printf '# One of the controller'"'"'s --log-level values.\n'
    printf 'DEPLOYER_CONTROLLER_LOG_LEVEL=info\n'
    printf '# More command-line options, split at spaces.\n'
    if [ -n "$operator_listen" ]; then
        printf 'DEPLOYER_CONTROLLER_OPTS="--operator-listen %s"\n' "$operator_listen"
    else
        printf 'DEPLOYER_CONTROLLER_OPTS=\n'
    fi
}

# render_settings: controller.yml with every setting at its default, as comments.
render_settings() {
    cat <<'YAML'
# deployer controller settings (see docs/decisions/031-notifications-and-job-retention.md).
# Edit, then run "systemctl restart deployer-controller". Every key is optional.
#
# jobs:
#   keep: 30d          # finished jobs' folders and operation outputs older than this go,
#   keep_last: 20      # except each environment's newest 20 jobs
# notify:
#   - name: ops
#     url: https://hooks.example.org/deployer
#     format: json     # or slack (a Slack-compatible incoming webhook)
#     key_file: /etc/deployer/notify-ops.key   # HMAC key: root:deployer, mode 0640
#     events: [job.finished, service.crash_loop, agent.lost, verify.drift]
# notify_retry: {first: 1s, max: 60s, give_up_after: 24h}
# health: {every: 10s, failures: 3, timeout: 2s}   # checks of live web instances
YAML
}

if [ "$print_config" = 1 ]; then
    render_env
    exit 0
fi

check_source "$source_dir"
require_root
umask 022 # the venv and the unit must be readable by the deployer user

# --- Install -----------------------------------------------------------------
pick_python
ensure_python
install_venv "$prefix" "$source_dir"
controller_bin=$prefix/.venv/bin/deployer-controller
[ -x "$controller_bin" ] || die "$controller_bin was not installed; is $source_dir the deployer source tree?"

if ! getent group "$SERVICE_USER" >/dev/null; then
    groupadd --system "$SERVICE_USER"
    info "created group $SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
        --shell /usr/sbin/nologin --comment "deployer controller" "$SERVICE_USER"
    info "created system user $SERVICE_USER"
fi
# The controller runs as that user: it must be able to run the venv's Python
# (not the case if the venv links to an interpreter under /root, e.g. pyenv).
runuser -u "$SERVICE_USER" -- "$prefix/.venv/bin/python" -c 'pass' ||
    die "user $SERVICE_USER cannot run $prefix/.venv/bin/python; rebuild it with --python /usr/bin/python3"

# The store must be 0700 and owned by the controller's user (systemd's
# StateDirectory= would do the same; done here too for a start by hand).
install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR" "$STORE_DIR"

if render_env | write_config_once "$ENV_FILE"; then
    :
else
    info "kept the existing $ENV_FILE (never overwritten)"
    if [ -n "$listen_given$operator_listen" ]; then
        warn "--listen/--operator-listen were NOT applied; edit $ENV_FILE to change them"
    fi
fi

# controller.yml: read by the controller itself (as $SERVICE_USER), so its
# group is $SERVICE_USER; webhook URLs may be secrets, so no one else reads it.
if render_settings | write_config_once "$SETTINGS_FILE"; then
    chgrp "$SERVICE_USER" "$SETTINGS_FILE"
else
    info "kept the existing $SETTINGS_FILE (never overwritten)"
fi

install_unit "$UNIT" "$prefix"

if systemd_is_pid1; then
    start_unit "$UNIT" || exit 1
else
    # No systemd, so no RuntimeDirectory=: make the socket directory by hand
    # (/run is a tmpfs, so this is needed again after every boot).
    install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$RUN_DIR"
    info "systemd is not running this machine, so nothing was enabled. Start the controller by hand (as root):"
    info "  install -d -m 0700 -o $SERVICE_USER -g $SERVICE_USER $RUN_DIR   # after each boot"
    info "  set -a; . $ENV_FILE; set +a"
    info "  runuser -u $SERVICE_USER -- sh -c 'umask 077; exec \"\$0\" \"\$@\"' $controller_bin \\"
    info "      --store $STORE_DIR --socket $SOCKET --config $SETTINGS_FILE \\"
    info "      --listen \"\$DEPLOYER_CONTROLLER_LISTEN\" --log-level \"\$DEPLOYER_CONTROLLER_LOG_LEVEL\" \$DEPLOYER_CONTROLLER_OPTS"
fi
info "operators: sudo -u $SERVICE_USER $prefix/.venv/bin/deployctl --socket $SOCKET ..."
