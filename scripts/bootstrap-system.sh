#!/usr/bin/env bash
# Installs the Debian packages the deployer's tests, demo and benchmarks need on a fresh machine.
# Idempotent: it only calls apt-get when something is missing.
set -euo pipefail

declare -A need=(
  [systemd-analyze]=systemd   # verifies the systemd units in deploy/
  [git]=git
  [ip]=iproute2
  [ps]=procps
  [nginx]=nginx-light         # routes web services
  [node]=nodejs               # the bundled example services
  [npm]=npm
  [mariadb]=mariadb-client    # databases are created through the client on the mysql agent
  [redis-cli]=redis-tools
  [curl]=curl
  [pebble]=pebble            # an ACME server (and its DNS), for the tls: auto tests
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages: ${missing[*]} (run as root or install them)" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
