#!/usr/bin/env bash
# Installs the BIG-bench task files (PyPI package bigbench==1.0.0) into the project's virtual environment,
# so that BIG-bench and BBH tasks can be read offline (colm/datasets/bigbench_package.py).
#
# `pip install bigbench==1.0.0` fails ("Distributions from PyPI cannot declare direct URL dependencies":
# the package names bleurt by URL), and its declared dependencies (TensorFlow, seqio, ...) are not needed
# to read the task files. So: fetch the source tarball once, check its sha256, install it with --no-deps.
# Idempotent: does nothing when the venv already finds the package.
#
# Usage: bash exp_launch/install_bigbench.sh
#   COLM_VENV        virtual environment to install into (default: <repo>/.venv)
#   BIGBENCH_SDIST   a local copy of bigbench-1.0.0.tar.gz to use instead of downloading
#   XDG_CACHE_HOME   the tarball is cached under ${XDG_CACHE_HOME:-$HOME/.cache}/colm
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${COLM_VENV:-$root/.venv}"
python="$venv/bin/python"
name="bigbench-1.0.0.tar.gz"
url="https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/$name"
sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/colm"
tarball="$cache_dir/$name"

say() { echo "[install_bigbench] $*" >&2; }

if [ ! -x "$python" ]; then
  say "no virtual environment at $venv (create it with: bash exp_launch/setup_python_env.sh, or set COLM_VENV)."
  exit 1
fi

# Found by path, without importing it (bigbench's modules import TensorFlow).
installed_tasks() {
  "$python" - <<'PY'
import importlib.util, os, sys
spec = importlib.util.find_spec("bigbench")
for location in (spec.submodule_search_locations or []) if spec else []:
    tasks = os.path.join(location, "benchmark_tasks")
    if os.path.isfile(os.path.join(tasks, "navigate", "task.json")):
        print(tasks)
        sys.exit(0)
sys.exit(1)
PY
}

if where="$(installed_tasks)"; then
  say "bigbench is already installed in $venv (tasks in $where); nothing to do."
  exit 0
fi

sha_ok() { [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$sha256" ]; }

mkdir -p "$cache_dir"
if [ -f "$tarball" ] && ! sha_ok "$tarball"; then
  say "cached $tarball has the wrong sha256; fetching it again."
  rm -f "$tarball"
fi
if [ ! -f "$tarball" ]; then
  tmp="$tarball.part.$$"
  trap 'rm -f "$tmp"' EXIT
  if [ -n "${BIGBENCH_SDIST:-}" ]; then
    say "using the local copy BIGBENCH_SDIST=$BIGBENCH_SDIST"
    cp "$BIGBENCH_SDIST" "$tmp"
  else
    say "downloading $url"
    if ! "$python" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" "$tmp"; then
      say "download failed. Without network, fetch $name elsewhere and run again with BIGBENCH_SDIST=<path to it>."
      exit 1
    fi
  fi
  if ! sha_ok "$tmp"; then
    say "sha256 mismatch for $name (expected $sha256); refusing to install it."
    exit 1
  fi
  mv "$tmp" "$tarball"
  trap - EXIT
fi

say "installing $tarball into $venv without its dependencies (builds in about two minutes)"
"$python" -m pip install -q --no-deps "$tarball"
if where="$(installed_tasks)"; then
  say "done: BIG-bench tasks in $where"
else
  say "pip finished but $venv still does not find bigbench's benchmark_tasks; see pip's output above."
  exit 1
fi
