"""The resume checkpoint of a training run: everything needed to continue bit for bit (design.md item 5).

One file, `exp_out/<exp_name>/resume.pt`, written atomically (colm/utils/atomic.py) every
`Trainer.checkpoint_step_interval` steps and read with `torch.load(weights_only=True)`: it holds only
tensors, numbers, strings, lists, tuples and dicts, so loading it runs no pickled code. Contents:

- "format", "step", "epoch", "batch_in_epoch", "num_steps", "datasets": where training stands;
- "params": {name: tensor} of every trainable parameter (the experts, gates, ...);
- "optimizer", "scheduler", "scaler": the state dicts (scaler: fp16's GradScaler, else None);
- "rng": python, numpy and torch (CPU and every CUDA device) generator states;
- "best_score", "best_step": the validating Evaluator's best so far, so a resumed run never lets a worse
  model overwrite best.pt;
- "tracked": the training statistics since the last report.

Why not HF accelerate's save_state/load_state: it loads its RNG file with a full pickle load (numpy's
state is an ndarray inside a tuple), saves the whole model (11 GB of frozen T5-XL weights per checkpoint
where we need the experts' few MB) and writes a directory of files non-atomically.
"""

import random

import numpy as np
import torch

from colm.utils.atomic import atomic_path

FORMAT = 1


def capture_rng_state() -> dict:
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": legacy[0], "key": torch.from_numpy(np.asarray(legacy[1], dtype=np.int64)),
                  "pos": int(legacy[2]), "has_gauss": int(legacy[3]), "cached_gaussian": float(legacy[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    legacy = state["numpy"]
    np.random.set_state((legacy["name"], legacy["key"].numpy().astype(np.uint32), legacy["pos"],
                         legacy["has_gauss"], legacy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            print(f"[colm] WARNING: the resume checkpoint has RNG states of {len(cuda)} CUDA device(s), this machine "
                  f"has {torch.cuda.device_count()}; the CUDA generators are not restored (dropout will differ).")
        else:
            torch.cuda.set_rng_state_all(cuda)


def write_resume(path: str, payload: dict) -> None:
    payload = dict(payload, format=FORMAT)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_resume(path: str) -> dict:
    """The resume payload at `path`; a damaged file is reported with what to do (never a pickle fallback)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects other than plain data
        raise RuntimeError(
            f"The resume checkpoint {path} cannot be read ({type(error).__name__}); it is damaged. Delete it to "
            "restart the run from step 0 (best.pt and the other results stay), or re-run with "
            "P/TRAIN/Trainer.overwrite=True."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise RuntimeError(f"{path} is not a resume checkpoint of format {FORMAT} (written by colm's Trainer). Delete "
                           "it to restart the run from step 0.")
    return payload
