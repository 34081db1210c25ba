"""Dataset families are found, not listed: adding a family is adding its `.py` and its `.gin` to colm/datasets/.

- Python: every module of colm.datasets is imported by `import_all` (colm.configurables, and colm.datasets.settings
  before its first lookup), so its gin configurables and its expert setting (`register_setting`) exist.
- Gin: every `colm/datasets/<family>.gin` is a registry of dataset scopes. A family may have one registry per
  model type, `<family>_<model_type>.gin` (a model type is a folder of colm/models/); `registry_files` picks the
  model type's file, else the `_t5xl` one, else `<family>.gin`. Families come in alphabetical order.

The launchers ask this module for the registries (`dataset_registries` in colm/experiments/bash_scripts/_common.sh):
    python -m colm.datasets.families <model_type>
prints one registry path per line, relative to the repository root. It imports nothing heavy, so keep it so.
"""

import importlib
import os
import pkgutil
import sys

from colm.utils.model_types import DEFAULT_MODEL_TYPE, REPO_ROOT, chosen_model_type, model_types

DATASETS_DIR = os.path.dirname(os.path.abspath(__file__))


def module_names() -> list:
    """Every module of colm.datasets, "colm.datasets.<name>", sorted."""
    return sorted(f"{__package__}.{info.name}" for info in pkgutil.iter_modules([DATASETS_DIR]))


def import_all() -> None:
    """Imports every module of colm.datasets (registers their gin configurables and expert settings)."""
    for name in module_names():
        importlib.import_module(name)


def _family_and_model_type(stem: str, types: list) -> tuple:
    """("p3", "t5xl") for "p3_t5xl"; ("bigbench", None) for "bigbench"."""
    family, sep, suffix = stem.rpartition("_")
    if sep and family and suffix in types:
        return family, suffix
    return stem, None


def registry_files(model_type=None) -> list:
    """One gin registry per dataset family for a model type (default $MODEL_TYPE, else t5xl), as paths relative
    to the repository root ("colm/datasets/p3_t5xl.gin"), families in alphabetical order."""
    model_type = chosen_model_type(model_type)
    types = model_types()
    variants = {}  # family -> {model type or None: file name}
    for file_name in sorted(os.listdir(DATASETS_DIR)):
        stem, ext = os.path.splitext(file_name)
        if ext == ".gin":
            family, variant = _family_and_model_type(stem, types)
            variants.setdefault(family, {})[variant] = file_name
    chosen = []
    for family in sorted(variants):
        files = variants[family]
        for preferred in (model_type, DEFAULT_MODEL_TYPE, None):
            if preferred in files:
                chosen.append(os.path.relpath(os.path.join(DATASETS_DIR, files[preferred]), REPO_ROOT))
                break
    return chosen


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit("usage: python -m colm.datasets.families [model_type]")
    print("\n".join(registry_files(sys.argv[1] if len(sys.argv) == 2 else None)))
