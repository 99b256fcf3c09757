# shellcheck shell=bash
# Helpers shared by install-agent.sh and install-controller.sh. Sourced, not
# run: it defines functions and changes nothing by itself.
#
# Expects the sourcing script to have set PROG (its name, for messages) and
# DEPLOY_DIR (the directory holding the unit files).

# The path the unit files carry; replaced by PREFIX/.venv when installing.
readonly DEFAULT_VENV_IN_UNITS=/opt/deployer/.venv
readonly UNIT_DIR=/etc/systemd/system
# shellcheck disable=SC2034 # used by the scripts that source this file
readonly CONFIG_DIR=/etc/deployer

info() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
# Bad command line: exit 2, like most tools.
usage_error() {
    printf '%s: %s\nTry: %s --help\n' "$PROG" "$*" "$PROG" >&2
    exit 2
}

# need_value OPTION "$#": an option that takes a value must have one.
need_value() {
    [ "$2" -ge 2 ] || usage_error "option $1 needs a value"
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (try: sudo $0 ...)"
}

# is_hostport VALUE: HOST:PORT with HOST a name, an IPv4 address or an IPv6
# address in brackets, and PORT 1-65535.
is_hostport() {
    local re='^([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})$'
    [[ $1 =~ $re ]] || return 1
    local port=$((10#${BASH_REMATCH[3]}))
    [ "$port" -ge 1 ] && [ "$port" -le 65535 ]
}

# port_of HOST:PORT
port_of() { printf '%s\n' "$((10#${1##*:}))"; }

# check_prefix PREFIX: an absolute path without characters that would need
# quoting in a unit file or escaping in sed (it ends up in ExecStart=).
check_prefix() {
    case $1 in
        /) usage_error "--prefix must not be /" ;;
        /*) ;;
        *) usage_error "--prefix must be an absolute path: $1" ;;
    esac
    [[ $1 =~ ^[A-Za-z0-9._/-]+$ ]] ||
        usage_error "--prefix may only contain letters, digits and . _ / -: $1"
}

# check_source DIR: a directory pip can install the project from.
check_source() {
    [ -d "$1" ] || usage_error "--source is not a directory: $1"
    [ -f "$1/pyproject.toml" ] || [ -f "$1/setup.py" ] ||
        usage_error "--source has no pyproject.toml: $1 (expected the deployer source tree)"
}

# pick_python: sets PYTHON to the interpreter the venv is made from, unless
# --python gave one. Debian's own /usr/bin/python3 is preferred over whatever
# python3 comes first in root's PATH (e.g. a pyenv build under /root, which
# other users, like the controller's, cannot even execute).
pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        return
    elif [ -x /usr/bin/python3 ]; then
        PYTHON=/usr/bin/python3
    elif command -v python3 >/dev/null 2>&1; then
        PYTHON=$(command -v python3)
    else
        PYTHON=/usr/bin/python3 # installed by ensure_python below
    fi
}

# ensure_python: PYTHON exists, is 3.11 or newer and can create venvs
# (Debian ships the venv/ensurepip part separately, in python3-venv).
ensure_python() {
    if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        if [ "$PYTHON" = /usr/bin/python3 ] && command -v apt-get >/dev/null 2>&1; then
            info "installing python3 and python3-venv with apt-get"
            apt-get update
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv
        else
            die "$PYTHON cannot create virtual environments (missing, or no venv/ensurepip module); install it or pass --python"
        fi
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is older than Python 3.11, which deployer needs; pass --python"
}

# install_venv PREFIX SOURCE: create PREFIX/.venv if needed (or if it no
# longer works, e.g. its Python was upgraded away) and pip-install the
# project from SOURCE into it. pip always rebuilds a project given as a
# directory, so re-running the installer upgrades the code in place.
install_venv() {
    local prefix=$1 source=$2 venv=$1/.venv
    mkdir -p "$prefix"
    if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'pass' >/dev/null 2>&1; then
        info "reusing virtualenv $venv"
    else
        info "creating virtualenv $venv with $PYTHON"
        "$PYTHON" -m venv --clear "$venv"
    fi
    info "installing deployer from $source"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input --upgrade "$source"
}

# install_unit NAME PREFIX: copy DEPLOY_DIR/NAME to UNIT_DIR, pointing its
# ExecStart= at PREFIX/.venv. Overwritten on every run: local changes belong
# in drop-ins (systemctl edit NAME).
install_unit() {
    local name=$1 prefix=$2 tmp
    tmp=$(mktemp)
    sed "s#${DEFAULT_VENV_IN_UNITS}/#${prefix}/.venv/#g" "$DEPLOY_DIR/$name" >"$tmp"
    mkdir -p "$UNIT_DIR"
    install -m 0644 -o root -g root "$tmp" "$UNIT_DIR/$name"
    rm -f "$tmp"
    info "installed $UNIT_DIR/$name"
}

# write_config_once PATH: write standard input to PATH (root:root, 0640)
# unless PATH exists. Returns 1 (after draining stdin) if it was kept: an
# operator's configuration is never overwritten.
write_config_once() {
    local path=$1 tmp
    if [ -e "$path" ]; then
        cat >/dev/null
        return 1
    fi
    mkdir -p "$(dirname "$path")"
    chmod 0755 "$(dirname "$path")"
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chown root:root "$tmp"
    chmod 0640 "$tmp"
    mv -n "$tmp" "$path"
    rm -f "$tmp"
    info "wrote $path"
}

# systemd_is_pid1: the check sd_booted(3) does.
systemd_is_pid1() { [ -d /run/systemd/system ]; }

# start_unit NAME: reload units, enable NAME at boot and (re)start it now, so
# that a re-run also puts freshly installed code to work. Returns non-zero
# if the start failed.
start_unit() {
    local name=$1
    systemctl daemon-reload
    systemctl enable "$name"
    info "starting $name (waits until it reports ready)"
    if systemctl restart "$name"; then
        info "$name is running: systemctl status $name"
    else
        warn "$name did not start; see: systemctl status $name; journalctl -u $name"
        return 1
    fi
}
