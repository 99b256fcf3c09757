#!/usr/bin/env bash
# Install (or upgrade) the deployer agent on this server. Run as root.
# See usage() below, or run with --help.
set -euo pipefail

PROG=$(basename "$0")
DEPLOY_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
# shellcheck source-path=SCRIPTDIR source=install-lib.sh
. "$DEPLOY_DIR/install-lib.sh"

readonly UNIT=deployer-agent.service
readonly CONFIG=$CONFIG_DIR/agent.yml

usage() {
    cat <<EOF
Usage: $PROG --controller HOST:PORT --id ID --role ROLE [--role ROLE]
             [--source DIR] [--prefix DIR] [--python PATH] [--print-config]
       DEPLOYER_TOKEN=TOKEN $PROG ...   (enrol this agent, first time only)

Install or upgrade the deployer agent on this server (run as root):
  - installs python3-venv with apt-get if it is missing,
  - creates the virtualenv PREFIX/.venv and pip-installs deployer from SOURCE,
  - writes $CONFIG (mode 0640) unless it already exists
    (an existing config is never overwritten, even if other values are given),
  - installs $UNIT into $UNIT_DIR,
  - enrols the agent if it has no certificate yet and DEPLOYER_TOKEN holds a
    token from \`deployctl token create\` (in the environment, so that it never
    shows in a process list),
  - if systemd runs this machine: enables the agent and (re)starts it;
    otherwise prints the command that starts it by hand.
Running it again upgrades the code and restarts the agent (operations in
progress are interrupted), keeping the config; --controller, --id and --role
are only needed the first time.

Options:
  --controller HOST:PORT  where the controller listens for agents, e.g.
                          deploy.example.net:7710 or [2001:db8::10]:7710
                          (or unix:/PATH for a controller on this machine)
  --id ID                 this agent's name, unique per controller
                          (letters, digits, . _ -), e.g. "\$(hostname -s)"
  --role ROLE             computing or daemons; repeat for both
  --source DIR            deployer source tree to install
                          (default: $(dirname "$DEPLOY_DIR"))
  --prefix DIR            install location, the venv goes to DIR/.venv
                          (default: /opt/deployer)
  --python PATH           interpreter for the venv, Python >= 3.11
                          (default: /usr/bin/python3)
  --print-config          print the agent.yml this would write, and exit
                          (changes nothing, needs no root)
  -h, --help              show this help

Example:
  sudo $DEPLOY_DIR/$PROG --controller deploy.example.net:7710 \\
      --id "\$(hostname -s)" --role daemons --role computing
EOF
}

controller='' agent_id='' source_dir='' prefix=/opt/deployer print_config=0
roles=()
PYTHON=''

while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --controller) need_value "$1" $# && controller=$2 && shift ;;
        --controller=*) controller=${1#*=} ;;
        --id) need_value "$1" $# && agent_id=$2 && shift ;;
        --id=*) agent_id=${1#*=} ;;
        --role) need_value "$1" $# && roles+=("$2") && shift ;;
        --role=*) roles+=("${1#*=}") ;;
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
if [ -n "$controller" ] && ! is_hostport "$controller" &&
    ! [[ $controller =~ ^unix:/[A-Za-z0-9._/-]+$ ]]; then
    usage_error "--controller must be HOST:PORT (IPv6 as [ADDR]:PORT) or unix:/PATH: $controller"
fi
if [ -n "$agent_id" ] && ! [[ $agent_id =~ ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ ]]; then
    usage_error "--id may only contain letters, digits and . _ - (at most 63, starting with a letter or digit): $agent_id"
fi
unique_roles=()
for role in "${roles[@]}"; do
    case $role in
        computing | daemons) ;;
        *) usage_error "--role must be computing or daemons: $role" ;;
    esac
    case " ${unique_roles[*]} " in
        *" $role "*) ;;
        *) unique_roles+=("$role") ;;
    esac
done
source_dir=${source_dir:-$(dirname "$DEPLOY_DIR")}
prefix=${prefix%/}
check_prefix "$prefix"

need_config_args() {
    [ -n "$controller" ] || usage_error "--controller is required to write $CONFIG"
    [ -n "$agent_id" ] || usage_error "--id is required to write $CONFIG"
    [ ${#unique_roles[@]} -gt 0 ] || usage_error "at least one --role is required to write $CONFIG"
}

# render_config: the agent.yml for the values given. Every value is quoted:
# an IPv6 "[...]:port" would otherwise read as a YAML list. The values were
# checked above, so none contains a quote or a backslash.
render_config() {
    printf '# deployer agent configuration, written by %s.\n' "$PROG"
    printf '# The installer never overwrites this file: edit it, then run\n'
    printf '# "systemctl restart deployer-agent". Every key is explained in\n'
    printf '# deploy/agent.example.yml of the deployer source tree.\n'
    printf 'id: "%s"\n' "$agent_id"
    printf 'controller: "%s"\n' "$controller"
    printf 'roles:\n'
    printf '  - "%s"\n' "${unique_roles[@]}"
    printf '# Defaults, shown for reference:\n'
    printf '# state_dir: /var/lib/deployer-agent\n'
    printf '# services_root: /srv/services\n'
    printf '# capabilities: []\n'
}

if [ "$print_config" = 1 ]; then
    need_config_args
    render_config
    exit 0
fi

# An existing config makes --controller/--id/--role optional (upgrade run).
[ -e "$CONFIG" ] || need_config_args
check_source "$source_dir"
require_root
umask 022 # the venv and the unit must be readable whatever root's umask is

# --- Install -----------------------------------------------------------------
pick_python
ensure_python
install_venv "$prefix" "$source_dir"
agent_bin=$prefix/.venv/bin/deployer-agent
[ -x "$agent_bin" ] || die "$agent_bin was not installed; is $source_dir the deployer source tree?"

if render_config | write_config_once "$CONFIG"; then
    :
else
    info "kept the existing $CONFIG (never overwritten)"
    if [ -n "$controller$agent_id" ] || [ ${#unique_roles[@]} -gt 0 ]; then
        warn "--controller/--id/--role were NOT applied; edit $CONFIG to change them"
    fi
fi

install_unit "$UNIT" "$prefix"

if [ -e /var/lib/deployer-agent/tls/agent.crt ]; then
    :
elif [ -n "${DEPLOYER_TOKEN:-}" ]; then
    "$agent_bin" enroll --config "$CONFIG" || die "enrolment failed (see the line above); nothing was started"
else
    warn "this agent has no certificate yet: on the controller run"
    warn "  deployctl token create --role ROLE --ttl 1h"
    warn "then here: DEPLOYER_TOKEN=TOKEN $agent_bin enroll --config $CONFIG"
fi

if systemd_is_pid1; then
    if ! start_unit "$UNIT"; then
        warn "the agent is installed; if it cannot reach its controller yet, systemd keeps retrying every few minutes"
        exit 1
    fi
else
    info "systemd is not running this machine, so nothing was enabled. Start the agent by hand (as root):"
    info "  $agent_bin --config $CONFIG"
fi
