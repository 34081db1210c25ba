"""Datasets read from local files, with no network access.

`LocalDataset` reads one split from any of:
  * a directory written by `datasets.save_to_disk` (a Dataset, or a DatasetDict
    from which `split` is taken);
  * a `.jsonl` / `.json` (JSON lines) or `.parquet` file (the whole file is the split);
  * a directory holding `<split>.jsonl`, `<split>.json` or `<split>.parquet`.
Rows stay in the Arrow table and are indexed lazily in `get_example`.

`LocalDataset.path` (see `resolve_dataset_path`): environment variables and `~` are expanded; an absolute
path is used as it is; a relative one is looked up first under `$COLM_DATA_DIR` (when that variable is set
and the path exists there), then in the current directory (the repository root for the launchers). So a
task family's gin file can name `my_tasks/echo` and each machine put the data where its COLM_DATA_DIR is.

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
# Token budget of inputs and targets unless a binding says otherwise: an unbounded input (a stray megabyte in one
# row) would otherwise ask for attention matrices of hundreds of GB. Truncation is reported (Dataset.__getitem__).
DEFAULT_MAX_LENGTH = 1024


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


def resolve_dataset_path(path):
    """Where a LocalDataset path points: (path to read, [places tried]) -- see the module doc."""
    expanded = os.path.expanduser(os.path.expandvars(str(path)))
    if os.path.isabs(expanded):
        return expanded, [expanded]
    tried = []
    root = os.environ.get(DATA_DIR_ENV)
    if root:
        candidate = os.path.join(os.path.expanduser(root), expanded)
        if os.path.exists(candidate):
            return candidate, [candidate]
        tried.append(candidate)
    tried.append(os.path.abspath(expanded))
    return expanded, tried


def check_json_lines_file(path):
    """Refuses, naming the file and line, an empty JSON(-lines) file and bytes that are not UTF-8 (the loader
    would fail with a bare StopIteration or a UnicodeDecodeError that names no file)."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"Local dataset file {path!r} is empty: it holds no rows. Write one JSON object per line, "
                         'e.g. {"input": "...", "target": "..."}.')
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"Local dataset file {path!r}, line {number}: bytes that are not UTF-8 at column {error.start + 1} "
                    f"({line[error.start:error.start + 4]!r}). Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None


def _read_file(path):
    kind = "parquet" if path.endswith(".parquet") else "json"
    import datasets as hf_datasets  # imported on use: it costs most of a second at start-up

    if kind == "json":
        check_json_lines_file(path)
    try:
        return hf_datasets.load_dataset(kind, data_files=path, split="train")
    except StopIteration:  # what the json loader raises on a file with no rows (e.g. only blank lines)
        raise ValueError(f"Local dataset file {path!r} holds no rows.") from None


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

    path: file or directory; defaults to dataset_path. Environment variables are
      expanded; a relative path is read from $COLM_DATA_DIR when it exists there,
      else from the current directory (`resolve_dataset_path`).
    input_field / target_field: columns holding the input and target strings.
    answer_choices_field: optional column with a list of answer choices.
    label_field: optional column with the index of the correct choice.
    references_field: optional column with a list of reference answers.
    max_length: token budget of inputs and targets, 1024 unless bound (None: unbounded); a longer example is
      truncated and the first one is reported.
    Refused when built, naming the file and row: an empty file, bytes that are not UTF-8, a row whose mapped
    field is missing or null.
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
        max_length=DEFAULT_MAX_LENGTH,
    ):
        path = path if path is not None else dataset_path
        if path is None:
            raise ValueError(f"LocalDataset {name!r}: set LocalDataset.path to a file or directory.")
        self.path, self._tried = resolve_dataset_path(path)
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
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"LocalDataset {self.name!r}: path {self.path!r} not found; looked in {self._tried}"
                + ("" if os.environ.get(DATA_DIR_ENV) or os.path.isabs(self.path) else
                   f" (set {DATA_DIR_ENV} to read relative paths from a data directory)")
                + "."
            )
        self.data = load_local_split(self.path, self.split)
        mapped = [column for column in self.fields.values() if column is not None]
        self.require_columns(mapped, f"{self.path!r} split {self.split!r}")
        if len(self.data) == 0:
            raise ValueError(f"LocalDataset {self.name!r}: {self.source_description()} holds no rows.")
        self.check_no_nulls(mapped)

    def check_no_nulls(self, columns):
        """A row without a mapped field (or with null there) is refused now, naming file, row and field; it
        would otherwise train on the string "None" or fail mid-run."""
        table = getattr(self.data, "data", None)  # the Arrow table behind a datasets.Dataset
        if table is None:
            return
        for column in columns:
            if table.column(column).null_count:
                values = table.column(column).to_pylist()
                row = next(i for i, v in enumerate(values) if v is None)
                field = next(k for k, c in self.fields.items() if c == column).replace("_str", "")
                role = "" if field == column else f", the {field} column"
                raise ValueError(
                    f"LocalDataset {self.name!r}: row {row} (line {row + 1} of a JSON-lines file) of "
                    f"{self.source_description()} has no {column!r} (missing or null{role}). Every row needs it: fix "
                    "the row or drop it.")

    def source_description(self):
        if os.path.isdir(self.path):  # name the split's file when the path is a folder of split files
            for ext in _SPLIT_FILE_EXTENSIONS:
                candidate = os.path.join(self.path, self.split + ext)
                if os.path.isfile(candidate):
                    return repr(candidate)
        return f"{self.path!r} (split {self.split!r})"

    def answer_choices_fix(self):
        if self.fields["answer_choices"] is None:
            lists = [c for c, feature in self.data.features.items()
                     if getattr(feature, "feature", None) is not None or isinstance(feature, list)]
            return (f'Name the column holding each row\'s list of choices: {self.name}/LocalDataset.answer_choices_field '
                    f'= "<column>"' + (f" (list columns here: {lists})" if lists else " (the file has no list column: "
                                       "add one, e.g. \"choices\": [\"no\", \"yes\"], to every row)")
                    + f', or score generated text instead: {self.name}/InterfaceInfo.interface = "gen".')
        return (f"Column {self.fields['answer_choices']!r} is empty in that row: give every row its list of "
                f'choices, or score generated text instead: {self.name}/InterfaceInfo.interface = "gen".')

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
