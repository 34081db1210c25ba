"""Where files live under exp_out/: the one place that names the files runs write and read.

    exp_out/<exp_name>/best.pt                              a stage's checkpoint (checkpoint_file)
    exp_out/<exp_name>/results.txt, results_in_training.txt evaluation results (save_results)
    exp_out/<concatenated>/experts.json                     expert names in index order (experts_file.py)
    exp_out/datasets_concatenated/<name>_<suffix>/best.pt   one expert in the MoE format (expert_path)
    exp_out/<exp_name>/averaged_hiddens<suffix>/<dataset>.safetensors   Average Activation (hiddens_file)
    <library dir>/D_<scope>_TRAIN_K<n>_embeddings.npy       a retrieval library (retrieval_library_name)

Per-dataset files are named after the dataset with "/" replaced by "_" (`D/TOYX/TRAIN` -> `D_TOYX_TRAIN`).
Checkpoint scripts name experiments by their directory relative to EXP_OUT. Path building only: nothing here
reads or writes a file. The run directory's own markers (run_status.json, resume.pt, .lock) are in
colm/utils/run_dir.py.
"""

import os

from colm.utils.paths import expand

EXP_OUT = "exp_out"
BEST_CHECKPOINT = "best.pt"
RESULTS_FILE = "results.txt"
RESULTS_IN_TRAINING_FILE = "results_in_training.txt"
EXPERTS_FILE = "experts.json"
TASK_BY_EXPERT_FILES = {"encoder": "task_by_expert_encoder.png", "decoder": "task_by_expert_decoder.png"}  # routing summaries
CONCATENATED_DIR = "datasets_concatenated"
HIDDENS_EXTENSION = ".safetensors"
RETRIEVAL_LIBRARY_SUFFIX = "_embeddings.npy"
RETRIEVAL_LIBRARY_GLOB = f"*_TRAIN_K*{RETRIEVAL_LIBRARY_SUFFIX}"


def dataset_file_name(dataset: str, extension: str) -> str:
    """`D/TOYX/TRAIN`, `.json` -> `D_TOYX_TRAIN.json`."""
    return dataset.replace("/", "_") + extension


def checkpoint_file(path: str, what: str = "path") -> str:
    """`<EXP_OUT>/<path>/best.pt` for an experiment path such as `datasets_concatenated/P3Socialiqa_t5xl_lora`.

    Refuses paths that leave EXP_OUT, or that already name it or the file."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{what} must be a non-empty experiment path relative to {EXP_OUT}/, got {path!r}.")
    path = expand(path, what).rstrip("/")
    first = path.split("/")[0]
    if os.path.isabs(path) or first in (EXP_OUT, "exp_out") or path.endswith(".pt"):
        raise ValueError(
            f"{what}={path!r}: give the experiment directory relative to {EXP_OUT}/, without {EXP_OUT}/ in front "
            f"and without {BEST_CHECKPOINT} (e.g. \"{CONCATENATED_DIR}/P3Socialiqa_t5xl_lora\" for "
            f"{EXP_OUT}/{CONCATENATED_DIR}/P3Socialiqa_t5xl_lora/{BEST_CHECKPOINT})."
        )
    if ".." in path.split("/"):
        raise ValueError(f"{what}={path!r}: '..' is not allowed in experiment paths; they stay inside {EXP_OUT}/ "
                         f"(name the directory relative to it, e.g. \"{CONCATENATED_DIR}/<name>\").")
    return os.path.join(EXP_OUT, path, BEST_CHECKPOINT)


def numbered_file(path: str, number: int) -> str:
    """`weights.pt`, 3 -> `weights.3.pt` (save_weights with add_index / add_global_step)."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.{number}{ext}"


def expert_path(name: str, suffix: str, expert_dir: str = CONCATENATED_DIR) -> str:
    """Experiment path (relative to EXP_OUT) of one expert's MoE-format checkpoint: `<expert_dir>/<name>_<suffix>`."""
    return f"{expert_dir}/{name}_{suffix}"


def hiddens_dir(exp_name: str, hiddens_suffix: str = "_a2") -> str:
    """`<EXP_OUT>/<exp_name>/averaged_hiddens<suffix>`: where SaveAveragedHiddens writes an expert's averages."""
    return os.path.join(EXP_OUT, exp_name, f"averaged_hiddens{hiddens_suffix}")


def hiddens_file(exp_name: str, dataset: str, hiddens_suffix: str = "_a2") -> str:
    return os.path.join(hiddens_dir(exp_name, hiddens_suffix), dataset_file_name(dataset, HIDDENS_EXTENSION))


def retrieval_library_name(scope: str, dataset_length: int) -> str:
    """`D_<scope with / -> _>_TRAIN_K<dataset_length>_embeddings.npy`: the library of the expert trained on
    `D/<scope>/TRAIN`, built from up to dataset_length examples."""
    return dataset_file_name(f"D/{scope}/TRAIN", f"_K{dataset_length}{RETRIEVAL_LIBRARY_SUFFIX}")


def retrieval_library_file(embeddings_path: str, scope: str, dataset_length: int) -> str:
    """`<EXP_OUT>/<embeddings_path>/<retrieval_library_name>`."""
    return os.path.join(EXP_OUT, expand(embeddings_path, "embeddings_path"),
                        retrieval_library_name(scope, dataset_length))


def retrieval_library_dataset(file: str) -> str:
    """`D_<scope>_TRAIN` of a library file (its name without `_K<n>_embeddings.npy`)."""
    return os.path.basename(file).rsplit("_K", 1)[0]
