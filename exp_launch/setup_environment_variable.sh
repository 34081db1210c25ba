# Source from the repository root:  source exp_launch/setup_environment_variable.sh
# Sets the project root, PYTHONPATH, Hugging Face caches under the user's cache dir, and the defaults the
# launchers use; activates the project's virtual environment (.venv) when there is one.
_colm_here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COLM_ROOT="$_colm_here"
export MM_ROOT="$COLM_ROOT"  # the original's name, kept for scripts that read it
export PYTHONPATH="$COLM_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HOME="${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/phatgoose}"
export HUGGINGFACE_HUB_CACHE="${HUGGINGFACE_HUB_CACHE:-$HF_HOME/hub}"
mkdir -p "$HF_HOME"
export TOKENIZERS_PARALLELISM=false
export WANDB_PROJECT="${WANDB_PROJECT:-phatgoose}"
if [ -x "$COLM_ROOT/.venv/bin/python" ] && [ -z "${COLM_NO_VENV:-}" ]; then
  export PYTHON_EXEC="$COLM_ROOT/.venv/bin/python"
else
  export PYTHON_EXEC="${PYTHON_EXEC:-python}"
fi
unset _colm_here
