"""Run logging: print always; Weights & Biases when asked for and possible.

The backend is decided once, when the run starts, and said in one line among its first:
- `main.logging_backend = None`: no remote logging.
- `main.logging_backend = "wandb"` (what `colm/experiments/wandb.gin` sets for the training launchers):
  - with WANDB_MODE set, wandb in that mode (`offline` writes under exp_out/<exp_name>/wandb/, `online`
    uploads; `disabled` means no remote logging);
  - else with a wandb login (WANDB_API_KEY, or a netrc entry for the wandb host, as `wandb login` writes),
    wandb online;
  - else no remote logging, and the line says how to turn it on. A run never dies for want of a login.
The wandb run's config is the run's gin config (every binding the run used); training summaries and
every evaluation's scores are logged as metrics, and the figures written beside the results (results.png, the
task-by-expert routing summaries) as wandb images.
"""

import netrc
import os
import re
from urllib.parse import urlparse

import gin

_STATE = {"backend": None, "run": None}
_NONE = (None, "None", "none")
DEFAULT_WANDB_HOST = "https://api.wandb.ai"
HOW_TO_TURN_ON = "run `wandb login` or set WANDB_MODE=offline (or online) to log to wandb"


def _say(message: str) -> None:
    print(f"[colm] logging: {message}", flush=True)


def wandb_login_found(environ=None) -> bool:
    """Whether wandb could log in without asking: WANDB_API_KEY, or a netrc entry for the wandb host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).hostname or ""
    path = environ.get("NETRC") or os.path.join(environ.get("HOME") or os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def decide_backend(backend, environ=None):
    """(backend, wandb mode or None, why): the backend a run with main.logging_backend=`backend` gets."""
    environ = os.environ if environ is None else environ
    if backend in _NONE:
        return None, None, "none (main.logging_backend=None)"
    if backend != "wandb":
        raise ValueError(f"main.logging_backend={backend!r} is not supported; use None or \"wandb\".")
    mode = (environ.get("WANDB_MODE") or "").strip().lower()
    if mode == "disabled":
        return None, None, "none (WANDB_MODE=disabled)"
    if mode:
        return "wandb", mode, f"wandb, mode {mode} (WANDB_MODE={mode})"
    if wandb_login_found(environ):
        return "wandb", "online", "wandb, mode online (wandb login found; WANDB_MODE=offline keeps it local)"
    return None, None, f"none: no wandb login and WANDB_MODE is unset; {HOW_TO_TURN_ON}"


def gin_config_dict(config_str=None) -> dict:
    """Gin bindings as {"scope/configurable.parameter": "value as gin writes it"}.

    config_str defaults to the operative config: the bindings the run has used so far.
    """
    text = gin.operative_config_str() if config_str is None else config_str
    out, key = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            key = None
            continue
        binding = re.match(r"([\w./]+)\s*=\s*(.*)$", line)
        if binding and not line[0].isspace():
            key = binding.group(1)
            out[key] = binding.group(2).rstrip("\\").strip()
        elif key is not None:  # a value gin wrapped onto the next lines
            out[key] = f"{out[key]} {line.strip().rstrip(chr(92)).strip()}".strip()
    return out


@gin.configurable
def wandb_logger_setup(exp_name, wandb_project_name="${WANDB_PROJECT}", logging_dir="exp_out/${EXP_NAME}",
                       mode=None):
    """A wandb run writing under `logging_dir`/wandb/ (wandb adds the `wandb` folder itself)."""
    import wandb

    project = os.path.expandvars(wandb_project_name)
    if "$" in project or not project:
        project = "colm"
    logging_dir = os.path.expandvars(logging_dir)
    os.makedirs(logging_dir, exist_ok=True)
    return wandb.init(project=project, name=exp_name, dir=logging_dir, mode=mode, reinit="finish_previous",
                      config={"exp_name": exp_name})


def setup_logger(backend, exp_name) -> None:
    """Decides the backend (see the module docstring), says it in one line, and starts the run."""
    backend, mode, why = decide_backend(backend)
    _STATE.update(backend=None, run=None)
    if backend is None:
        _say(why)
        return
    try:
        run = wandb_logger_setup(exp_name, mode=mode)
    except Exception as error:  # a login that is refused, no network, a broken install: log nothing, run on
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        _say(f"none: wandb could not start ({type(error).__name__}: {first}); {HOW_TO_TURN_ON}")
        return
    _STATE.update(backend="wandb", run=run)
    files = getattr(run, "dir", None)  # <logging_dir>/wandb/<run>/files
    _say(f"{why}; run files in {os.path.dirname(files)}" if files else why)


def log_config(config: dict | None = None) -> None:
    """Records the run's gin config (default: the operative config so far) as the wandb run's config."""
    if _STATE["run"] is not None:
        _STATE["run"].config.update(gin_config_dict() if config is None else config, allow_val_change=True)


def log_metrics(metrics: dict, step: int) -> None:
    """Logs flat {name: number} metrics; nested dicts are flattened with '/'."""
    flat = _flatten(metrics)
    if _STATE["run"] is not None and flat:
        _STATE["run"].log(flat, step=step)


def log_images(images: dict) -> None:
    """Logs {name: path of a PNG} as wandb images (a no-op without a wandb run). Logged without a step: at the
    run's current step, so a figure is never dropped for coming after a later-stepped metric."""
    run = _STATE["run"]
    if run is None or not images:
        return
    import wandb

    try:
        run.log({name: wandb.Image(path) for name, path in images.items()})
    except Exception as error:  # an unreadable file, a wandb without Image: the run goes on without the figures
        _say(f"figures {sorted(images)} not logged to wandb ({type(error).__name__}: {error})")


def finish_logger() -> None:
    """Ends the wandb run (with the config the whole run used), if there is one."""
    run = _STATE["run"]
    if run is not None:
        log_config()
        run.finish()
    _STATE.update(backend=None, run=None)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
    return out
