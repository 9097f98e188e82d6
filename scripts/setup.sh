#!/usr/bin/env bash
# Sets up starflow2-jax on a fresh Debian machine with Python 3.11 (run as root, or with sudo).
#   bash scripts/setup.sh          the library + the Fashion-MNIST data package (for the demo)
#   bash scripts/setup.sh --test   the library + test dependencies (tests write their own data)
# Creates ./.venv; re-running is safe and quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' \
  || { echo "starflow2-jax needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }

if [[ "${1:-}" == "--test" ]]; then
  extras="[test]"
else
  extras=""
  if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
    SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq dataset-fashion-mnist
  fi
fi

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
