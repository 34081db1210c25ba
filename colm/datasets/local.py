"""Datasets read from local files, with no network access.

`LocalDataset` reads one split from any of:
  * a directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict
    from which `split` is taken);
  * a `.jsonl` / `.json` (JSON lines) or `.parquet` file (the whole file is the split);
  * a directory holding `<split>.jsonl`, `<split>.json` or `<split>.parquet`.
Rows stay in the Arrow table and are indexed lazily in `get_example`.

`resolve_local_source` lets the hub loaders use local copies: when the
environment variable COLM_DATA_DIR is set and `$COLM_DATA_DIR/<name>[/<config>]`
exists (e.g. `$COLM_DATA_DIR/super_glue/rte`), that directory is used instead of
downloading `<name>` (with `<config>`) from the Hugging Face hub.
"""

import os

import gin

from colm.datasets.dataset import TableDataset

DATA_DIR_ENV = "COLM_DATA_DIR"
_SPLIT_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet")
_RESERVED_KEYS = ("label", "references", "multi_label", "answer_choices")


def resolve_local_source(hf_path_parts):
    """Local directory replacing a hub dataset, or None.

    hf_path_parts: (name,) or (name, config), or a "name/config" string.
    """
    if isinstance(hf_path_parts, str):
        hf_path_parts = [hf_path_parts]
    root = os.environ.get(DATA_DIR_ENV)
    parts = [p for p in hf_path_parts if p]
    if not root or not parts:
        return None
    candidate = os.path.join(os.path.expanduser(root), *parts)
    return candidate if os.path.exists(candidate) else None


def _read_file(path):
    kind = "parquet" if path.endswith(".parquet") else "json"
    import datasets as hf_datasets  # imported on use: it costs most of a second at start-up

    return hf_datasets.load_dataset(kind, data_files=path, split="train")


def load_local_split(path, split):
    """Returns the `datasets.Dataset` for `split` found at `path` (see module doc)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"Local dataset path {path!r} does not exist.")
    if os.path.isfile(path):
        if not path.endswith(_SPLIT_FILE_EXTENSIONS):
            raise ValueError(f"Local dataset file {path!r} is not one of {list(_SPLIT_FILE_EXTENSIONS)}.")
        return _read_file(path)
    contents = sorted(os.listdir(path))
    if "dataset_dict.json" in contents or "state.json" in contents:
        import datasets as hf_datasets

        data = hf_datasets.load_from_disk(path)
        if isinstance(data, hf_datasets.DatasetDict):
            if split not in data:
                raise KeyError(f"Split {split!r} not in {path!r}; available splits: {sorted(data)}.")
            return data[split]
        return data
    for ext in _SPLIT_FILE_EXTENSIONS:
        candidate = os.path.join(path, split + ext)
        if os.path.isfile(candidate):
            return _read_file(candidate)
    raise FileNotFoundError(
        f"No data for split {split!r} in {path!r}: expected a save_to_disk directory or one of "
        f"{[split + e for e in _SPLIT_FILE_EXTENSIONS]}; the directory holds {contents}."
    )


@gin.configurable
class LocalDataset(TableDataset):
    """A dataset read from local files; field names map columns to example keys.

    path: file or directory (environment variables are expanded); defaults to
      dataset_path.
    input_field / target_field: columns holding the input and target strings.
    answer_choices_field: optional column with a list of answer choices.
    label_field: optional column with the index of the correct choice.
    references_field: optional column with a list of reference answers.
    """

    def __init__(
        self,
        name,
        split,
        batch_size,
        path=None,
        input_field="input",
        target_field="target",
        answer_choices_field=None,
        label_field=None,
        references_field=None,
        dataset_path=None,
        seed=42,
        max_examples_per_dataset=None,
        metrics=None,
        max_length=None,
    ):
        path = path if path is not None else dataset_path
        if path is None:
            raise ValueError(f"LocalDataset {name!r}: set LocalDataset.path to a file or directory.")
        self.path = os.path.expanduser(os.path.expandvars(path))
        self.fields = {
            "input_str": input_field,
            "target_str": target_field,
            "answer_choices": answer_choices_field,
            "label": label_field,
            "references": references_field,
        }
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
        self.data = load_local_split(self.path, self.split)
        mapped = [column for column in self.fields.values() if column is not None]
        self.require_columns(mapped, f"{self.path!r} split {self.split!r}")

    def get_example(self, i):
        row = self.data[int(i)]
        # Keep the raw columns too, except those whose names have a meaning
        # for Dataset.__getitem__ unless they were mapped explicitly below.
        example = {k: v for k, v in row.items() if k not in _RESERVED_KEYS}
        example["input_str"] = str(row[self.fields["input_str"]])
        example["target_str"] = str(row[self.fields["target_str"]])
        choices_col = self.fields["answer_choices"]
        example["answer_choices"] = [str(c) for c in row[choices_col]] if choices_col else []
        if self.fields["label"] is not None:
            example["label"] = int(row[self.fields["label"]])
        if self.fields["references"] is not None:
            example["references"] = [str(r) for r in row[self.fields["references"]]]
        return example
