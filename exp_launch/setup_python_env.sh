#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and installs the
# pinned requirements. Idempotent: it reinstalls only when a requirements file changed.
# Usage: bash exp_launch/setup_python_env.sh [--dev]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COLM_VENV:-$root/.venv}"
reqs="$root/requirements.txt"
[ "${1:-}" = "--dev" ] && reqs="$root/requirements-dev.txt"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.colm-installed-$(basename "$reqs")"
want="$(cat "$root/requirements.txt" "$reqs" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing $(basename "$reqs") into $venv (first run takes a few minutes)"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # promptsource (the P3 templates) declares python<3.10 and old pins (streamlit 0.82, black, ...); its code
  # runs on 3.11 beside setuptools<81 (it imports pkg_resources), so it is installed last, without its
  # declared dependencies. Installed before the requirements, it would make pip print a red "ERROR: pip's
  # dependency resolver ..." listing those pins, so a refresh takes it out first and puts it back after.
  if "$venv/bin/python" -m pip show -q promptsource >/dev/null 2>&1; then
    "$venv/bin/python" -m pip uninstall -q -y promptsource
  fi
  "$venv/bin/python" -m pip install -q -r "$reqs"
  "$venv/bin/python" -m pip install -q --no-deps --ignore-requires-python --no-warn-conflicts "promptsource==0.2.3"
  echo "$want" > "$stamp"
fi
