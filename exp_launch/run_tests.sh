#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (pinned requirements), then runs ruff and pytest.
#   bash exp_launch/run_tests.sh            # everything
#   bash exp_launch/run_tests.sh -k lora    # extra arguments go to pytest
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash exp_launch/setup_python_env.sh --dev
source exp_launch/setup_environment_variable.sh
# Tiny models gain nothing from intra-op threads; spinning OpenMP threads slow a shared 2-core machine tenfold.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
"$PYTHON_EXEC" -m ruff check .
# Two workers, one per core: most of the time goes to launcher subprocesses, which run one thread each.
"$PYTHON_EXEC" -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
