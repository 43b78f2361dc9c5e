#!/usr/bin/env bash
# Install the tools that check deploy/ (tests/deploy): pinned PyPI packages into the
# project's virtualenv and, when missing, Debian packages (promtool, nginx,
# systemd-analyze). Idempotent; returns in well under a second when all is in place.
#   scripts/install_deploy_tools.sh            # uses ./.venv
#   VENV=/path/to/venv scripts/install_deploy_tools.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
REQS="$ROOT/deploy/tools-requirements.txt"

log() { printf 'install_deploy_tools: %s\n' "$*" >&2; }

# --- PyPI tools, pinned in deploy/tools-requirements.txt ------------------------------
if [[ ! -x "$VENV/bin/pip" ]]; then
    log "no virtualenv at $VENV (create it first: python3.11 -m venv .venv)"
    exit 1
fi
# Which pins are not installed at exactly their version (a quick metadata look-up).
stale="$("$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for raw in open(sys.argv[1]):
    line = raw.split("#", 1)[0].strip()
    if not line:
        continue
    name, _, pinned = line.partition("==")
    try:
        ok = version(name) == pinned
    except PackageNotFoundError:
        ok = False
    if not ok:
        print(line, end=" ")
PY
)"
missing_bin=""
for bin in docker-compose envoy hadolint kubernetes-validate supervisord supervisorctl; do
    [[ -x "$VENV/bin/$bin" ]] || missing_bin="$missing_bin $bin"
done
if [[ -n "$stale" || -n "$missing_bin" ]]; then
    log "installing pinned PyPI tools into $VENV: ${stale:-}${missing_bin:+(missing:$missing_bin)}"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQS"
    "$VENV/bin/python" -c 'import helm_python, yaml, supervisor, dockerfile' >/dev/null
fi

# --- Debian packages, only when a command is missing ----------------------------------
declare -A deb_for=([promtool]=prometheus [nginx]=nginx [systemd-analyze]=systemd)
packages=()
for cmd in promtool nginx systemd-analyze; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$cmd" ]]; then
        packages+=("${deb_for[$cmd]}")
    fi
done
if ((${#packages[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing Debian packages ${packages[*]}; run as root or: sudo apt-get install ${packages[*]}"
        exit 1
    fi
    log "installing Debian packages: ${packages[*]}"
    # Never start the packaged daemons (prometheus, nginx) while installing them.
    policy_created=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy_created=yes
    fi
    trap '[[ -n "$policy_created" ]] && rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
