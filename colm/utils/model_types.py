"""Model types: the folders of colm/models/ (t5xl, tiny, ...), each holding the gin files of one base model.

On the ground floor because both the data room (a dataset family may have one registry per model type) and
colm/models/model_gins.py (the launchers' -model_type) need it. Imports nothing heavy.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS_DIR = os.path.join(REPO_ROOT, "colm", "models")
DEFAULT_MODEL_TYPE = "t5xl"  # the paper's base; also the registry a family without one for the chosen type uses


def model_types() -> list:
    """The model types there are, sorted."""
    return sorted(d for d in os.listdir(MODELS_DIR) if os.path.isdir(os.path.join(MODELS_DIR, d)) and d.isidentifier())


def chosen_model_type(model_type=None) -> str:
    """The model type asked for: the argument, else $MODEL_TYPE, else t5xl; an unknown one is an error."""
    model_type = model_type or os.environ.get("MODEL_TYPE") or DEFAULT_MODEL_TYPE
    if model_type not in model_types():
        raise ValueError(f"no model type '{model_type}' (no folder colm/models/{model_type}); "
                         f"use one of {', '.join(model_types())}.")
    return model_type
