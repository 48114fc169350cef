#!/usr/bin/env bash
# Install everything ldm_train needs on a Debian/Ubuntu machine, then run the demo or the tests.
#   bash launch/setup.sh demo [ldm-train demo args...]   # e.g. run.dir=runs/mine
#   bash launch/setup.sh test [pytest args...]
# Installs the system font package (apt-get, via sudo when not root), creates .venv and installs
# the project with its dev extra into it. Safe to re-run: finished steps are skipped quickly.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
[ -n "$mode" ] && shift
case "$mode" in
  demo|test|install) ;;
  *) echo "usage: bash launch/setup.sh demo|test|install [args...]" >&2; exit 2 ;;
esac

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
apt_packages=()
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }  # not just config files left
installed fonts-noto-color-emoji || apt_packages+=(fonts-noto-color-emoji)
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || apt_packages+=(python3-venv)
if [ "$mode" = test ]; then
  # the tests' local Slurm (launch/slurm_local.sh); iproute2: its two-host mode (network namespaces)
  for pkg in slurmctld slurmd slurm-client munge iproute2; do
    installed "$pkg" || apt_packages+=("$pkg")
  done
fi
if [ "${#apt_packages[@]}" -gt 0 ]; then
  echo "setup: installing system packages: ${apt_packages[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${apt_packages[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
echo "setup: installing ldm_train and its dependencies into .venv (first time: a few minutes)"
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

case "$mode" in
  demo) exec .venv/bin/ldm-train demo "$@" ;;
  test) exec .venv/bin/python -m pytest -q -n 2 --dist loadgroup "$@" ;;  # two workers: see tests/conftest.py
  install) echo "setup: done; run .venv/bin/ldm-train --help" ;;
esac
