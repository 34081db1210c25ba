"""Which gin files of colm/models/ a run composes: the model type's folder and the file of each -arch.

The one place for the launchers' `-model_type` and `-arch` flags (`model_gin_dir` and `arch_gin` in
colm/experiments/bash_scripts/_common.sh call it) and for scripts/calibrate_routers.py:

    python -m colm.models.model_gins <model_type>                    # colm/models/<model_type>
    python -m colm.models.model_gins <model_type> <arch> [allowed ...]  # colm/models/<model_type>/<arch's file>

prints the path relative to the repository root, or the reason on stderr (exit 2). It imports nothing heavy.
"""

import os
import sys

from colm.utils.model_types import chosen_model_type

MODELS_DIR = "colm/models"  # relative to the repository root, as the launchers run

# -arch -> the model gin of colm/models/<model_type>/ (each one owns its MoE build list, Model.init_moma_calls).
ARCH_FILES = {
    # token routing at every linear, one router per linear (PHATGOOSE's evaluation)
    "A2": "moe_lora_rank16_a2.gin",
    # token routing in the encoder; one router for the whole decoder, once per example
    "A1": "moe_lora_rank16_a1.gin",
    # sentence-level routing with every expert weighted (no top-k): a one-expert checkpoint applied alone, as the
    # Single expert, Merged Experts and Multitask baselines are evaluated
    "single": "moe_lora_rank16_single.gin",
}


def model_dir(model_type=None) -> str:
    """colm/models/<model_type> (default $MODEL_TYPE, else t5xl); an unknown model type is an error."""
    return os.path.join(MODELS_DIR, chosen_model_type(model_type))


def arch_gin(arch: str, model_type=None, allowed=None) -> str:
    """The model gin of an -arch for the model type; `allowed` narrows the choice (a launcher that takes some)."""
    choices = [a for a in ARCH_FILES if allowed is None or a in allowed]
    if arch not in choices:
        raise ValueError(f"-arch must be {', '.join(choices[:-1])} or {choices[-1]}, got '{arch}'."
                         if len(choices) > 1 else f"-arch must be {choices[0]}, got '{arch}'.")
    return os.path.join(model_dir(model_type), ARCH_FILES[arch])


def _main(argv) -> int:
    if not 1 <= len(argv) <= 1 + 1 + len(ARCH_FILES):
        print("usage: python -m colm.models.model_gins <model_type> [<arch> [allowed arch ...]]", file=sys.stderr)
        return 2
    try:
        print(model_dir(argv[0]) if len(argv) == 1 else arch_gin(argv[1], argv[0], argv[2:] or None))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
