"""FLAN v2 tasks (Flan2021, NIV2 categories, Dialog) read from per-task folders (spec 6.3).

A task lives in `$COLM_DATA_DIR/<dataset_path>` (e.g. `FLANV2/Flan2021/glue/sst2:2.0.0`), a folder written by
`python scripts/flan.py` (colm.datasets.flan_release) from the Open-Orca/FLAN release: rows with `inputs`,
`targets` and `_template_type`. Loading keeps the zero-shot rows (or the few-shot ones), drops blank
inputs/targets, permutes the rest with a fixed seed and splits it: validation = the first
min(10% of the rows, 10 000), train = the remaining rows. Everything stays in the Arrow table; the
dataset holds an index array over it.
"""

import os

import gin
import numpy as np
import pyarrow.compute as pc

from colm.datasets.dataset import TableDataset
from colm.datasets.hub import path_parts
from colm.datasets.local import DATA_DIR_ENV, load_local_split, resolve_local_source

ANSWER_OPTIONS = {"all": ("opt", "noopt"), "opt": ("opt",), "noopt": ("noopt",)}
SPLITS = ("train", "validation")
SPLIT_SEED = 1234
VALIDATION_FRACTION = 0.1
MAX_VALIDATION = 10_000
BUILD_COMMAND = (
    "python scripts/flan.py --release_dir <local copy of Open-Orca/FLAN> --out_dir $COLM_DATA_DIR "
    "--niv2_tasks_dir <natural-instructions/tasks>"
)


def template_types(answer_options="all", is_few_shot=False):
    """The `_template_type` values kept: zs_opt / zs_noopt (or fs_* when few-shot)."""
    if answer_options not in ANSWER_OPTIONS:
        raise ValueError(f"FlanDataset.answer_options={answer_options!r}; use one of {sorted(ANSWER_OPTIONS)}.")
    shots = "fs" if is_few_shot else "zs"
    return tuple(f"{shots}_{option}" for option in ANSWER_OPTIONS[answer_options])


def split_rows(kept, split):
    """Rows of `split` among the `kept` row numbers: permuted with RandomState(1234), validation first."""
    if split not in SPLITS:
        raise ValueError(f"FlanDataset split {split!r} is not one of {list(SPLITS)}.")
    kept = np.asarray(kept, dtype=np.int64)
    order = kept[np.random.RandomState(SPLIT_SEED).permutation(len(kept))]
    num_validation = min(int(VALIDATION_FRACTION * len(kept)), MAX_VALIDATION)
    return order[:num_validation] if split == "validation" else order[num_validation:]


def _not_blank(column):
    return pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(column), ""), False)


@gin.configurable
class FlanDataset(TableDataset):
    """One FLAN task (or NIV2 category) folder; items are (inputs -> targets), evaluated by generation.

    dataset_path: folder under $COLM_DATA_DIR, a string "FLANV2/Flan2021/glue/sst2:2.0.0" or a list of
      parts joined by "/".
    split: "train" or "validation" (both carved out of the folder's single split, see module doc).
    answer_options: "all" (zs_opt and zs_noopt rows), "opt" or "noopt".
    is_few_shot: keep the few-shot (fs_*) rows instead of the zero-shot ones.
    """

    def __init__(
        self,
        name,
        split,
        batch_size,
        dataset_path=gin.REQUIRED,
        answer_options="all",
        is_few_shot=False,
        input_field="inputs",
        target_field="targets",
        template_type_field="_template_type",
        seed=42,
        max_examples_per_dataset=None,
        metrics=None,
        max_length=None,
    ):
        self.kept_types = template_types(answer_options, is_few_shot)
        if split not in SPLITS:
            raise ValueError(f"FlanDataset {name!r}: split {split!r} is not one of {list(SPLITS)}.")
        self.fields = (input_field, target_field, template_type_field)
        super().__init__(
            name=name,
            split=split,
            batch_size=batch_size,
            dataset_path=dataset_path,
            seed=seed,
            max_examples_per_dataset=max_examples_per_dataset,
            metrics=metrics,
            max_length=max_length,
        )

    def load_data(self):
        relative = "/".join(str(p).strip("/") for p in path_parts(self.dataset_path))
        path = resolve_local_source([relative])
        if path is None or not os.path.isdir(path):
            root = os.environ.get(DATA_DIR_ENV)
            where = os.path.join(os.path.expanduser(root), relative) if root else f"${DATA_DIR_ENV}/{relative} ({DATA_DIR_ENV} is not set)"
            raise FileNotFoundError(
                f"FlanDataset {self.name!r}: FLAN folder {where} not found. Build the "
                f"FLAN folders once with\n  {BUILD_COMMAND}\nand export {DATA_DIR_ENV} to that --out_dir."
            )
        self.data = load_local_split(path, "train")
        self.require_columns(self.fields, f"{path!r} (rebuild it with `{BUILD_COMMAND}`)")

    def process_data(self):
        table = self.data.data  # the Arrow table; a freshly loaded dataset has no index mapping
        input_field, target_field, type_field = self.fields
        types = table.column(type_field)
        wanted = None
        for kind in self.kept_types:
            hit = pc.fill_null(pc.match_substring(types, kind), False)
            wanted = hit if wanted is None else pc.or_(wanted, hit)
        keep = pc.and_(wanted, pc.and_(_not_blank(table.column(input_field)), _not_blank(table.column(target_field))))
        kept = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        self.data = self.data.select(split_rows(kept, self.split))

    def get_example(self, i):
        row = self.data[int(i)]
        input_field, target_field, _ = self.fields
        example = {k if k.startswith("_") else f"_{k}": v for k, v in row.items()}
        target = str(row[target_field])
        example.update(input_str=str(row[input_field]), target_str=target, answer_choices=[], references=[target])
        return example
