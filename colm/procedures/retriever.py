"""Retriever: builds the retrieval baseline's expert libraries (spec 4.8.5 step 1, 5.7).

make_expert_library=True: for every expert TRAIN dataset (`D/<scope>/TRAIN`) it embeds up to
`dataset_length` examples (a seeded random subset when there are more) with the sentence embedder, as
"Answer Choices: <choices>, Instance: <input>" when include_answer_choices (else the bare input), and
writes the (n, 384) float32 matrix to the file that `retrieval_library_name` names (colm/formats/layout.py),
in expert_library_dir. `make_checkpoint_for_retrieval` then packs these files into router vectors.

make_expert_library=False: a diagnostic (step 4). It loads every library file of expert_library_dir,
sends each example of each dataset to the library holding its nearest embedding, and prints the
majority library per dataset. Nothing is written.

Under torchrun rank 0 does all of it alone (embedding a few thousand examples per dataset is not worth sharding)
while the other ranks wait for its result; only rank 0 writes and prints.
"""

import glob
import os

import gin
import numpy as np
import torch

from colm.formats.layout import RETRIEVAL_LIBRARY_GLOB, retrieval_library_dataset, retrieval_library_name
from colm.moma.embedder import DEFAULT_MODEL, embed_texts
from colm.moma.feature_extractor import example_text
from colm.procedures.procedure import Procedure
from colm.utils import distributed
from colm.utils.atomic import atomic_path
from colm.utils.coerce import as_bool
from colm.utils.paths import expand
from colm.utils.progress import progress


def library_indices(size: int, dataset_length: int, seed: int) -> list:
    """All indices, or a sorted seeded random subset of dataset_length of them."""
    if size <= dataset_length:
        return list(range(size))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(size, size=dataset_length, replace=False))


def train_scope(dataset_name: str) -> str:
    """`D/<scope>/TRAIN` -> `<scope>` (e.g. FLANV2AI2ARCEASY/ZS)."""
    if not (dataset_name.startswith("D/") and dataset_name.endswith("/TRAIN")):
        raise ValueError(f"Retriever: {dataset_name!r} is not an expert training set; a library is built from "
                         "D/<scope>/TRAIN datasets (Retriever.datasets, or setting_scopes.split=\"TRAIN\").")
    return dataset_name[len("D/"):-len("/TRAIN")]


@gin.configurable
class Retriever(Procedure):
    linking_fields = ("datasets",)

    def __init__(self, name, datasets=gin.REQUIRED, include_answer_choices=gin.REQUIRED,
                 make_expert_library=gin.REQUIRED, expert_library_dir=gin.REQUIRED, dataset_length=gin.REQUIRED,
                 model_name=DEFAULT_MODEL, batch_size=64, device="auto", seed=42):
        super().__init__(name, seed)
        if not isinstance(dataset_length, int) or isinstance(dataset_length, bool) or dataset_length < 1:
            raise ValueError(f"Retriever.dataset_length must be a positive integer, got {dataset_length!r}.")
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self.include_answer_choices = as_bool(include_answer_choices, "Retriever.include_answer_choices")
        self.make_expert_library = as_bool(make_expert_library, "Retriever.make_expert_library")
        self.expert_library_dir = expand(expert_library_dir, "Retriever.expert_library_dir")
        self.dataset_length = dataset_length
        self.model_name = model_name
        self.batch_size = batch_size
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device

    def late_init(self):
        if self.make_expert_library:
            for dataset in self.datasets:
                train_scope(dataset.name)  # refuse a non-TRAIN set before embedding anything
            os.makedirs(self.expert_library_dir, exist_ok=True)

    def describe(self) -> str:
        mode = "makes libraries in" if self.make_expert_library else "diagnoses against the libraries of"
        return f"Retriever {mode} {self.expert_library_dir} for {len(self.datasets)} dataset(s)"

    def library_file(self, scope: str) -> str:
        return os.path.join(self.expert_library_dir, retrieval_library_name(scope, self.dataset_length))

    def texts_of(self, dataset) -> list:
        texts = []
        for i in library_indices(len(dataset), self.dataset_length, self.seed):
            example = dataset.get_example(i)
            texts.append(example_text(example["input_str"], example.get("answer_choices"),
                                      self.include_answer_choices))
        return texts

    def embed(self, dataset) -> torch.Tensor:
        return embed_texts(self.texts_of(dataset), self.batch_size, self.model_name, self.device).cpu()

    def run(self):
        if distributed.is_distributed():
            result = None
            if distributed.is_main():
                print(f"[colm] {self.name}: rank 0 runs the Retriever alone; the other "
                      f"{distributed.world_size() - 1} rank(s) wait for it", flush=True)
                result = self._run()
            return distributed.broadcast_from_main(result)  # the other ranks wait here for rank 0
        return self._run()

    def _run(self):
        return self.write_libraries() if self.make_expert_library else self.diagnose()

    def write_libraries(self) -> dict:
        written = {}
        for dataset in progress(self.datasets, desc=self.name, unit="dataset", dynamic_ncols=True):
            matrix = self.embed(dataset).numpy().astype(np.float32)
            path = self.library_file(train_scope(dataset.name))
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare path
                    np.save(f, matrix)
            written[dataset.name] = path
        print(f"[colm] {self.name}: wrote {len(written)} expert libraries to {self.expert_library_dir}")
        return written

    def diagnose(self) -> dict:
        files = sorted(glob.glob(os.path.join(glob.escape(self.expert_library_dir), RETRIEVAL_LIBRARY_GLOB)))
        if not files:
            raise FileNotFoundError(
                f"Retriever: no library files ({RETRIEVAL_LIBRARY_GLOB}) in {self.expert_library_dir}; make them "
                "first with Retriever.make_expert_library=True (retriever.sh -make_expert_library True)."
            )
        names = [retrieval_library_dataset(f) for f in files]
        matrices = [torch.from_numpy(np.load(f, allow_pickle=False)).float() for f in files]
        library = torch.cat(matrices)
        owner = torch.cat([torch.full((len(m),), i) for i, m in enumerate(matrices)])
        votes = {}
        for dataset in progress(self.datasets, desc=self.name, unit="dataset", dynamic_ncols=True):
            queries = self.embed(dataset)
            if len(queries) == 0:
                print(f"[colm] {self.name} {dataset.name}: no examples, skipped")
                continue
            # Both sides are unit norm, so the dot product is the cosine; chunks bound the similarity matrix.
            nearest = torch.cat([(chunk @ library.T).argmax(dim=1) for chunk in queries.split(256)])
            counts = torch.bincount(owner[nearest], minlength=len(names))
            best = int(counts.argmax())
            votes[dataset.name] = {"library": names[best], "share": round(float(counts[best]) / len(queries), 4)}
            print(f"[colm] {self.name} {dataset.name}: nearest library {names[best]} for "
                  f"{votes[dataset.name]['share']:.0%} of {len(queries)} examples")
        return votes
