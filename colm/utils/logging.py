"""Run logging: print always, and Weights & Biases when `main.logging_backend = "wandb"`.

wandb honours WANDB_MODE (offline / disabled), so the same configs run on machines without a network.
"""

import os

import gin

_STATE = {"backend": None, "run": None}


@gin.configurable
def wandb_logger_setup(exp_name, wandb_project_name="${WANDB_PROJECT}", logging_dir="exp_out/wandb"):
    import wandb

    project = os.path.expandvars(wandb_project_name)
    if "$" in project:
        project = "colm"
    if os.environ.get("WANDB_API_KEY"):
        wandb.login(key=os.environ["WANDB_API_KEY"])
    logging_dir = os.path.expandvars(logging_dir)
    os.makedirs(logging_dir, exist_ok=True)
    return wandb.init(project=project, name=exp_name, dir=logging_dir, reinit="finish_previous")


def setup_logger(backend, exp_name) -> None:
    if backend in (None, "None", "none"):
        _STATE.update(backend=None, run=None)
    elif backend == "wandb":
        _STATE.update(backend="wandb", run=wandb_logger_setup(exp_name))
    else:
        raise ValueError(f"main.logging_backend={backend!r} is not supported; use None or \"wandb\".")


def log_metrics(metrics: dict, step: int) -> None:
    """Logs flat {name: number} metrics; nested dicts are flattened with '/'."""
    flat = _flatten(metrics)
    if _STATE["run"] is not None:
        _STATE["run"].log(flat, step=step)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, (int, float)):
            out[name] = value
    return out
