"""Builds the per-task FLAN folders that `FlanDataset` reads, from a local copy of the Open-Orca/FLAN release.

The release (https://huggingface.co/datasets/Open-Orca/FLAN) holds one folder per submix and template
type, `<submix>_<zsopt|zsnoopt|fsopt|fsnoopt>_data/part.<k>.parquet`, whose rows have the columns
`inputs`, `targets`, `_template_type` (zs_opt, zs_noopt, fs_opt, fs_noopt), `_task_name`, and usually
`_task_source` and `_template_idx`. Folder -> destination (explicit, see `SUBMIX_FOLDERS`):

  flan_*_data    -> $OUT/FLANV2/Flan2021/<_task_name>/     e.g. Flan2021/glue/sst2:2.0.0
  dialog_*_data  -> $OUT/FLANV2/Dialog/<_task_name>/       e.g. Dialog/qrecc
  niv2_*_data    -> $OUT/FLANV2/NIV2/<category>/           the task's first NIV2 category
                                                           (colm.datasets.niv2_categories)
  t0_*, cot_*    -> not used (P3 experts read promptsource; CoT has no expert)

Every template type goes into the same folder (FlanDataset picks zero-/few-shot rows when it loads), and
rows are kept as they are (blank ones included). A folder is a `datasets` DatasetDict with one "train"
split. Files are streamed batch by batch into one Arrow stream per destination, so memory stays at one
batch; each destination is then saved under a hidden `.partial-*` folder and renamed into place, so a
folder that exists is complete. Complete folders are skipped unless `overwrite`. NIV2 tasks with no
category are dropped and listed in the report.
"""

import dataclasses
import os
import re
import shutil
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from colm.datasets.niv2_categories import NIV2_CATEGORIES, CategoryLookup
from colm.utils.progress import interactive

FLAN_ROOT = "FLANV2"
# release submix -> folder under FLANV2/; other submixes are ignored.
SUBMIX_FOLDERS = {"flan": "Flan2021", "niv2": "NIV2", "dialog": "Dialog"}
DEFAULT_SUBMIXES = tuple(SUBMIX_FOLDERS)
RELEASE_FOLDER = re.compile(r"^(?P<submix>[a-z0-9]+)_(?P<templates>zsopt|zsnoopt|fsopt|fsnoopt)_data$")
REQUIRED_COLUMNS = ("inputs", "targets", "_template_type", "_task_name")
OUTPUT_SCHEMA = pa.schema([
    ("inputs", pa.string()),
    ("targets", pa.string()),
    ("_template_type", pa.string()),
    ("_task_name", pa.string()),
    ("_task_source", pa.string()),
    ("_template_idx", pa.int64()),
])
PARTIAL_PREFIX = ".partial-"
COMPLETE_MARKER = "dataset_dict.json"  # written by save_to_disk, only ever seen after the final rename


@dataclasses.dataclass
class BuildReport:
    written: dict = dataclasses.field(default_factory=dict)  # destination (under FLANV2/) -> rows
    skipped_complete: list = dataclasses.field(default_factory=list)
    uncategorised_niv2: dict = dataclasses.field(default_factory=dict)  # NIV2 task -> rows dropped
    outside_registry: dict = dataclasses.field(default_factory=dict)  # category not in NIV2_CATEGORIES -> tasks
    ignored_folders: list = dataclasses.field(default_factory=list)  # release folders not used

    def summary(self) -> str:
        lines = [f"wrote {len(self.written)} folder(s), {sum(self.written.values())} rows"]
        if self.skipped_complete:
            lines.append(f"skipped {len(self.skipped_complete)} complete folder(s) (use --overwrite to rebuild)")
        if self.ignored_folders:
            lines.append(f"ignored release folders: {', '.join(self.ignored_folders)}")
        if self.uncategorised_niv2:
            tasks = ", ".join(f"{t} ({n} rows)" for t, n in sorted(self.uncategorised_niv2.items()))
            lines.append(f"NIV2 tasks with no category, dropped: {tasks}")
        if self.outside_registry:
            cats = ", ".join(f"{c!r} <- {sorted(ts)}" for c, ts in sorted(self.outside_registry.items()))
            lines.append(f"NIV2 categories that no registry expert reads: {cats}")
        return "\n".join(lines)


def flan_folder(out_dir: str, destination: str) -> str:
    """Absolute folder of a destination such as "Flan2021/glue/sst2:2.0.0"."""
    return os.path.join(out_dir, FLAN_ROOT, *destination.split("/"))


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def release_files(release_dir: str, submixes=DEFAULT_SUBMIXES):
    """([(submix, parquet path)], [ignored folder names]) of a local Open-Orca/FLAN copy, sorted."""
    if not os.path.isdir(release_dir):
        raise FileNotFoundError(
            f"FLAN release folder {release_dir!r} does not exist; download Open-Orca/FLAN (e.g. "
            "`huggingface-cli download Open-Orca/FLAN --repo-type dataset --local-dir <dir>`) and pass that dir."
        )
    unknown = sorted(set(submixes) - set(SUBMIX_FOLDERS))
    if unknown:
        raise ValueError(f"Unknown submix(es) {unknown}; choose among {sorted(SUBMIX_FOLDERS)}.")
    files, ignored = [], []
    for entry in sorted(os.listdir(release_dir)):
        folder = os.path.join(release_dir, entry)
        match = RELEASE_FOLDER.match(entry)
        if not os.path.isdir(folder) or not match:
            continue
        if match.group("submix") not in submixes:
            ignored.append(entry)
            continue
        parts = sorted(f for f in os.listdir(folder) if f.endswith(".parquet"))
        files.extend((match.group("submix"), os.path.join(folder, f)) for f in parts)
    if not files:
        raise FileNotFoundError(
            f"No <submix>_<zsopt|zsnoopt|fsopt|fsnoopt>_data/*.parquet files for submixes {list(submixes)} in "
            f"{release_dir!r} (it holds {sorted(os.listdir(release_dir))[:20]})."
        )
    return files, ignored


def _checked_task_path(task_name: str, source: str) -> str:
    parts = task_name.split("/")
    if not task_name or task_name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{source}: task name {task_name!r} cannot be used as a folder name.")
    return task_name


def _conform(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch in OUTPUT_SCHEMA: same column order and types, absent optional columns as nulls."""
    arrays = []
    for field in OUTPUT_SCHEMA:
        if field.name in batch.schema.names:
            arrays.append(batch.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(root: str) -> None:
    """Deletes `.partial-<pid>-*` folders left by builds whose process is gone (interrupted runs)."""
    if not os.path.isdir(root):
        return
    for entry in os.listdir(root):
        if entry.startswith(PARTIAL_PREFIX) and not _pid_alive(entry[len(PARTIAL_PREFIX):].split("-")[0]):
            shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


class _Destinations:
    """Maps release rows to destinations and streams them into one Arrow file per destination."""

    def __init__(self, out_dir, categories, overwrite, only, report):
        self.out_dir = out_dir
        self.categories = CategoryLookup(categories) if categories is not None else None
        self.overwrite = overwrite
        self.only = set(only) if only is not None else None
        self.report = report
        self.partial = os.path.join(out_dir, FLAN_ROOT, f"{PARTIAL_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.names = []  # destination id -> destination
        self.ids = {}  # destination -> id, or -1 when its rows are skipped
        self.task_ids = {}  # (submix, task name) -> destination id or -1
        self.writers = {}
        self.rows = {}

    def destination_of(self, submix: str, task_name: str, source: str):
        folder = SUBMIX_FOLDERS[submix]
        if submix != "niv2":
            return f"{folder}/{_checked_task_path(task_name, source)}"
        category = self.categories(task_name)
        if category is None:
            return None
        if category not in NIV2_CATEGORIES:
            self.report.outside_registry.setdefault(category, set()).add(task_name)
        return f"{folder}/{_checked_task_path(category, source)}"

    def id_of(self, submix: str, task_name, source: str) -> int:
        key = (submix, task_name)
        if key in self.task_ids:
            return self.task_ids[key]
        destination = None if task_name is None else self.destination_of(submix, task_name, source)
        if destination is None:
            ident = -1
        elif destination in self.ids:
            ident = self.ids[destination]
        else:
            skip = self.only is not None and destination not in self.only
            if not skip and not self.overwrite and is_complete(flan_folder(self.out_dir, destination)):
                self.report.skipped_complete.append(destination)
                skip = True
            ident = -1 if skip else len(self.names)
            if not skip:
                self.names.append(destination)
            self.ids[destination] = ident
        self.task_ids[key] = ident
        return ident

    def write(self, submix: str, batch: pa.RecordBatch, source: str) -> None:
        encoded = pc.dictionary_encode(batch.column("_task_name"))
        lut = np.array(
            [self.id_of(submix, name, source) for name in encoded.dictionary.to_pylist()] + [-1], dtype=np.int64
        )
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        row_ids = lut[codes]  # code -1 (null task) hits the trailing -1
        if submix == "niv2":
            self._count_uncategorised(encoded, codes, lut)
        order = np.argsort(row_ids, kind="stable")
        ids, starts, counts = np.unique(row_ids[order], return_index=True, return_counts=True)
        if not np.any(ids >= 0):
            return
        grouped = _conform(batch).take(pa.array(order))
        for ident, start, count in zip(ids, starts, counts):
            if ident >= 0:
                self._writer(int(ident)).write_batch(grouped.slice(int(start), int(count)))
                self.rows[int(ident)] = self.rows.get(int(ident), 0) + int(count)

    def _count_uncategorised(self, encoded, codes, lut) -> None:
        names = encoded.dictionary.to_pylist()
        counts = np.bincount(codes[codes >= 0], minlength=len(names))
        for code, name in enumerate(names):
            if lut[code] < 0 and counts[code] and self.categories(name) is None:
                self.report.uncategorised_niv2[name] = self.report.uncategorised_niv2.get(name, 0) + int(counts[code])

    def _writer(self, ident: int):
        if ident not in self.writers:
            os.makedirs(self.partial, exist_ok=True)
            self.writers[ident] = pa.ipc.new_stream(os.path.join(self.partial, f"{ident}.arrow"), OUTPUT_SCHEMA)
        return self.writers[ident]

    def finish(self, progress: bool) -> None:
        """Saves each destination as a DatasetDict and renames it into place."""
        import datasets as hf_datasets
        from tqdm.auto import tqdm

        for writer in self.writers.values():
            writer.close()
        bars_were_on = not hf_datasets.are_progress_bars_disabled()
        hf_datasets.disable_progress_bars()  # one bar per folder would drown ours
        try:
            bar_off = not (progress and interactive())  # on a terminal only: no redraw frames in a log file
            for ident in tqdm(sorted(self.writers), desc="saving FLAN folders", disable=bar_off):
                destination = self.names[ident]
                stream = os.path.join(self.partial, f"{ident}.arrow")
                staged = os.path.join(self.partial, str(ident))
                data = hf_datasets.Dataset.from_file(stream)
                hf_datasets.DatasetDict({"train": data}).save_to_disk(staged)
                del data
                os.remove(stream)
                _move_into_place(staged, flan_folder(self.out_dir, destination), self.partial)
                self.report.written[destination] = self.rows[ident]
        finally:
            if bars_were_on:
                hf_datasets.enable_progress_bars()

    def close(self) -> None:
        for writer in self.writers.values():
            try:
                writer.close()
            except (OSError, pa.ArrowException):
                pass
        shutil.rmtree(self.partial, ignore_errors=True)


def _move_into_place(staged: str, final: str, partial: str) -> None:
    os.makedirs(os.path.dirname(final), exist_ok=True)
    old = None
    if os.path.exists(final):  # overwrite: move the old folder aside first, delete it after the swap
        old = os.path.join(partial, f"old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_flan_folders(
    release_dir,
    out_dir,
    categories=None,
    submixes=DEFAULT_SUBMIXES,
    overwrite=False,
    only=None,
    batch_rows=16384,
    progress=True,
) -> BuildReport:
    """Writes $out_dir/FLANV2/{Flan2021,Dialog,NIV2}/... from a local Open-Orca/FLAN copy (see module doc).

    categories: {NIV2 task name: category} (colm.datasets.niv2_categories); required when NIV2 is built.
    only: optional destinations to build (e.g. {"Flan2021/glue/sst2:2.0.0", "NIV2/Translation"}); rows of
      other destinations are skipped.
    """
    from tqdm.auto import tqdm

    report = BuildReport()
    if only is not None and not overwrite:
        pending = [d for d in only if not is_complete(flan_folder(out_dir, d))]
        if not pending:
            report.skipped_complete.extend(sorted(only))
            return report
    files, report.ignored_folders = release_files(release_dir, submixes)
    if categories is None and any(submix == "niv2" for submix, _ in files):
        raise ValueError(
            "NIV2 rows are grouped by task category: pass --niv2_tasks_dir (natural-instructions tasks/) or "
            "--niv2_categories (TSV/JSON task -> category), or leave niv2 out of --submixes."
        )
    total = 0
    for _, path in files:
        schema = pq.read_schema(path)
        missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
        if missing:
            raise KeyError(f"Release file {path!r} lacks column(s) {missing}; its columns are {schema.names}.")
        total += pq.read_metadata(path).num_rows
    _remove_stale_partials(os.path.join(out_dir, FLAN_ROOT))
    destinations = _Destinations(out_dir, categories, overwrite, only, report)
    try:
        bar_off = not (progress and interactive())  # on a terminal only: no redraw frames in a log file
        with tqdm(total=total, unit="rows", desc="reading FLAN release", disable=bar_off) as bar:
            for submix, path in files:
                parquet = pq.ParquetFile(path)
                columns = [f.name for f in OUTPUT_SCHEMA if f.name in parquet.schema_arrow.names]
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=columns):
                    destinations.write(submix, batch, path)
                    bar.update(batch.num_rows)
        destinations.finish(progress)
    finally:
        destinations.close()
    report.skipped_complete.sort()
    return report
