"""The expert library (colm/formats/expert_library.py, colm/checkpoints/library.py): entries from one-expert
checkpoints and from splitting a concatenated one, concatenation of any list of entries, the files it touches,
and the methods that start from a concatenation (Arrow, Merged Experts, Retrieval, Average Activation)."""

import json
import os
import runpy
import sys

import numpy as np
import pytest
import torch

from colm.checkpoints import concatenate as C
from colm.checkpoints import library as lib
from colm.checkpoints import merging, retrieval, router_from_weights
from colm.checkpoints.averaged_hiddens import insert_averaged_hiddens_state
from colm.checkpoints.cli import run as run_cli
from colm.datasets.settings import get_setting
from colm.formats import expert_library as L
from colm.formats import keys as K
from colm.formats import layout
from colm.formats.checkpoint_io import read_checkpoint, write_checkpoint
from colm.formats.experts_file import read_experts_file, write_experts_file
from colm.formats.peft_adapters import CONFIG_FILE, WEIGHTS_FILE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 4
DIMS = {  # module -> (d_in, d_out)
    "encoder.block.0.layer.0.SelfAttention.q": (8, 8),
    "encoder.block.0.layer.1.DenseReluDense.wo": (12, 8),
    "decoder.block.0.layer.1.EncDecAttention.v": (8, 8),
}
NAMES = ["ToySummary", "ToyReverse", "ToyInstrument", "ToyTopic"]


def one_expert(seed, gate=True, zero_router=False):
    """A one-expert checkpoint as gate training and use_input_gate_as_router leave it (gate = router vector)."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.embed_tokens.weight": torch.ones(10, 8)}
    for m, (d_in, d_out) in DIMS.items():
        state[K.layer1_key(m, 0)] = torch.randn(d_in, R, generator=g)
        state[K.layer2_key(m, 0)] = torch.randn(R, d_out, generator=g)
        router = torch.zeros(d_in) if zero_router else torch.randn(d_in, generator=g)
        state[K.router_key(m, 0)] = router
        if gate:
            state[K.gate_key(m)] = router.clone()
    return state


@pytest.fixture
def exp_out(tmp_path, monkeypatch):
    root = tmp_path / "exp_out"
    monkeypatch.setattr(layout, "EXP_OUT", str(root))
    monkeypatch.setenv("MODEL_TYPE", "tiny")
    return root


def write_experts(exp_out, names=NAMES, suffix="lora_gate", **kwargs):
    states = {}
    for seed, name in enumerate(names):
        states[name] = one_expert(seed + 1, **kwargs)
        write_checkpoint(states[name], str(exp_out / layout.expert_path(name, suffix) / "best.pt"))
    return states


def add_all(exp_out, library, names=NAMES, suffix="lora_gate"):
    for name in names:
        lib.add_to_library(layout.expert_path(name, suffix), str(library), name, command="test")


def read_out(exp_out, rel):
    return read_checkpoint(str(exp_out / rel / "best.pt"))


def test_add_writes_one_directory_with_the_expert_and_its_metadata(exp_out, tmp_path):
    states = write_experts(exp_out, NAMES[:1])
    library = tmp_path / "library"
    entry = lib.add_to_library(layout.expert_path("ToySummary", "lora_gate"), str(library), "ToySummary",
                               command="python scripts/expert_library.py add ...")
    assert sorted(os.listdir(library)) == ["ToySummary"]  # no temporary directory left
    assert sorted(os.listdir(entry)) == [L.METADATA_FILE, L.WEIGHTS_FILE]
    stored = L.read_weights(entry)
    expected = {k: v for k, v in states["ToySummary"].items() if K.parse_indexed(k) is not None}
    assert stored.keys() == expected.keys() and all(torch.equal(stored[k], v) for k, v in expected.items())
    metadata = L.read_metadata(entry)
    assert metadata["name"] == "ToySummary" and metadata["scope"] == "TOYSUMMARY"  # the setting table's scope
    assert metadata["rank"] == R and metadata["modules"] == list(DIMS) and metadata["dtype"] == "float32"
    assert metadata["router_vectors"] == "set" and metadata["gate"] is True
    assert metadata["model_type"] == "tiny" and metadata["base_model"] == "colm/models/tiny/toy_t5"
    assert metadata["format_version"] == L.FORMAT_VERSION and metadata["command"].startswith("python scripts/")
    assert metadata["source"].endswith("ToySummary_lora_gate/best.pt")
    # An existing entry is kept unless overwrite; a gate not yet copied into the router is refused.
    before = (library / "ToySummary" / L.WEIGHTS_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        lib.add_to_library(layout.expert_path("ToySummary", "lora_gate"), str(library), "ToySummary")
    assert (library / "ToySummary" / L.WEIGHTS_FILE).read_bytes() == before
    uncopied = one_expert(5)
    for m in DIMS:
        uncopied[K.router_key(m, 0)] = torch.zeros(DIMS[m][0])
    write_checkpoint(uncopied, str(tmp_path / "uncopied.pt"))
    with pytest.raises(ValueError, match="use_input_gate_as_router"):
        lib.add_to_library(str(tmp_path / "uncopied.pt"), str(library), "Uncopied")
    write_checkpoint(one_expert(6), str(tmp_path / "other.pt"))
    lib.add_to_library(str(tmp_path / "other.pt"), str(library), "ToySummary", overwrite=True)
    assert L.read_metadata(entry)["source"].endswith("other.pt")
    assert sorted(os.listdir(library)) == ["ToySummary"]
    with pytest.raises(ValueError, match="not an expert library entry name"):
        lib.add_to_library(str(tmp_path / "uncopied.pt"), str(library), "a/b")


def test_library_concatenation_equals_the_classic_one_in_any_order(exp_out, tmp_path):
    write_experts(exp_out)
    library = tmp_path / "library"
    add_all(exp_out, library)
    order = ["ToyTopic", "ToySummary", "ToyInstrument"]  # a subset, not in the setting's order
    C.run_concatenate(datasets=order, suffix="lora_gate", out_path="Classic")
    C.run_concatenate(datasets=order, library=str(library), out_path="FromLibrary")
    classic, from_library = read_out(exp_out, "Classic"), read_out(exp_out, "FromLibrary")
    experts_only = {k: v for k, v in classic.items() if not K.is_embedding_key(k)}
    assert from_library.keys() == experts_only.keys()
    assert all(torch.equal(from_library[k], v) for k, v in experts_only.items())
    names = read_experts_file(str(exp_out / "FromLibrary" / layout.EXPERTS_FILE))
    assert names == read_experts_file(str(exp_out / "Classic" / layout.EXPERTS_FILE))
    # Entries by path, mixed with names; a setting name takes its experts from the library by name.
    C.run_concatenate(datasets=[str(library / "ToyTopic"), "ToySummary"], library=str(library), out_path="Mixed")
    assert [e["name"] for e in read_experts_file(str(exp_out / "Mixed" / layout.EXPERTS_FILE))] == order[:2]
    with pytest.raises(FileNotFoundError, match=r"4 of 8 library entries missing"):
        C.run_concatenate(datasets="Toy", library=str(library), out_path="Toy")
    with pytest.raises(ValueError, match="more than once"):
        C.run_concatenate(datasets=["ToyTopic", str(library / "ToyTopic")], library=str(library), out_path="Twice")
    with pytest.raises(ValueError, match="no library is bound"):
        C.run_concatenate(datasets=[str(library / "ToyTopic"), "ToySummary"], out_path="Unbound")


def test_entries_of_another_rank_are_refused_before_any_tensor_is_read(exp_out, tmp_path):
    write_experts(exp_out, NAMES[:2])
    library = tmp_path / "library"
    add_all(exp_out, library, NAMES[:2])
    metadata_file = library / NAMES[1] / L.METADATA_FILE
    metadata = json.loads(metadata_file.read_text())
    metadata["rank"] = 8
    metadata_file.write_text(json.dumps(metadata))
    (library / NAMES[1] / L.WEIGHTS_FILE).write_bytes(b"not read")
    with pytest.raises(ValueError, match="has rank 8"):
        C.run_concatenate(datasets=NAMES[:2], library=str(library), out_path="Bad")
    assert not (exp_out / "Bad").exists()


class FileLog:
    """Which files a block opens for reading and which it creates or changes: Python-level opens (an audit hook;
    torch.load and json go through it), safetensors' own reads (its Rust code bypasses Python's open),
    and a before/after snapshot of the tree (size, mtime, inode) for what was created or changed."""

    def __init__(self, root, monkeypatch):
        import safetensors.torch as st

        self.root, self.reads = str(root), set()
        load_file = st.load_file
        monkeypatch.setattr(st, "load_file", lambda path, *a, **k: (self._opened(path, "r"), load_file(path, *a, **k))[1])
        self.active = False
        sys.addaudithook(self._hook)  # hooks cannot be removed; this one records only while active

    def _hook(self, event, args):
        # io.open's event has a string mode; os.open's (mode None) are atomic_path's fsyncs of its own files.
        if self.active and event == "open" and isinstance(args[0], str) and isinstance(args[1], str):
            self._opened(args[0], args[1])

    def _opened(self, path, mode):
        path = os.path.abspath(path)
        # Only files that exist: a look for an optional file (a run's run_status.json) reads nothing.
        if self.active and "r" in mode and "+" not in mode and path.startswith(self.root) and os.path.isfile(path):
            self.reads.add(os.path.relpath(path, self.root))

    def _snapshot(self):
        files = {}
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.join(directory, name)
                stat = os.stat(path)
                files[os.path.relpath(path, self.root)] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        return files

    def run(self, block):
        self.reads, before = set(), self._snapshot()
        self.active = True
        try:
            block()
        finally:
            self.active = False
        after = self._snapshot()
        written = sorted(p for p in after if before.get(p) != after[p])
        return sorted(self.reads), written, sorted(set(before) - set(after))


def test_adding_one_expert_and_reconcatenating_touches_only_what_it_must(exp_out, tmp_path, monkeypatch):
    write_experts(exp_out)
    library = tmp_path / "library"
    log = FileLog(tmp_path, monkeypatch)
    add_all(exp_out, library, NAMES[:3])
    C.run_concatenate(datasets=NAMES[:2], library=str(library), out_path="Two")

    reads, written, removed = log.run(lambda: lib.add_to_library(
        layout.expert_path(NAMES[3], "lora_gate"), str(library), NAMES[3], command="test"))
    print("\nadd ToyTopic: read", reads, "\n              wrote", written, "removed", removed)
    assert reads == [f"exp_out/datasets_concatenated/{NAMES[3]}_lora_gate/best.pt"]
    assert written == [f"library/{NAMES[3]}/{L.METADATA_FILE}", f"library/{NAMES[3]}/{L.WEIGHTS_FILE}"]
    assert removed == []

    subset = [NAMES[3], NAMES[0]]
    reads, written, removed = log.run(lambda: C.run_concatenate(datasets=subset, library=str(library),
                                                                out_path="TopicSummary"))
    print("concatenate [ToyTopic, ToySummary]: read", reads, "\n              wrote", written, "removed", removed)
    assert reads == sorted(f"library/{n}/{f}" for n in subset for f in (L.METADATA_FILE, L.WEIGHTS_FILE))
    assert written == ["exp_out/TopicSummary/best.pt", f"exp_out/TopicSummary/{layout.EXPERTS_FILE}"]
    assert removed == []
    out = read_out(exp_out, "TopicSummary")
    assert torch.equal(out[K.layer1_key(list(DIMS)[0], 0)], L.read_weights(str(library / NAMES[3]))[
        K.layer1_key(list(DIMS)[0], 0)])


def concatenated_three(tmp_path, names=("A", "B", "C")):
    """A 3-expert concatenated checkpoint with the embed_tokens keys released checkpoints carry."""
    states = [one_expert(seed, gate=False) for seed in range(len(names))]
    state = C.concatenate_states((f"expert {i}", s) for i, s in enumerate(states))
    state["decoder.embed_tokens.weight"] = torch.ones(10, 8)
    directory = tmp_path / "released"
    write_checkpoint(state, str(directory / "best.pt"))
    return state, directory


def test_split_then_concatenate_is_the_original_and_entries_export_to_peft(exp_out, tmp_path):
    state, directory = concatenated_three(tmp_path)
    write_experts_file(str(directory), {"MyEcho": "MYECHO", "ToyTopic": "TOYTOPIC", "Mine": "MINESCOPE"})
    library = tmp_path / "library"
    entries = lib.split_checkpoint(str(directory / "best.pt"), str(library), command="test")
    assert [os.path.basename(e) for e in entries] == ["MyEcho", "ToyTopic", "Mine"]
    assert L.read_metadata(entries[2])["scope"] == "MINESCOPE"
    assert all(L.read_metadata(e)["router_vectors"] == "set" for e in entries)
    C.run_concatenate(datasets=["MyEcho", "ToyTopic", "Mine"], library=str(library), out_path="RoundTrip")
    again = read_out(exp_out, "RoundTrip")
    experts_only = {k: v for k, v in state.items() if not K.is_embedding_key(k)}  # the base model's, not stored
    assert again.keys() == experts_only.keys()
    assert all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in experts_only.items())
    assert (exp_out / "RoundTrip" / layout.EXPERTS_FILE).read_text() == (directory / layout.EXPERTS_FILE).read_text()
    # Any subset, in any order; expert 2 of the original becomes expert 0.
    C.run_concatenate(datasets=["Mine", "MyEcho"], library=str(library), out_path="Subset")
    subset = read_out(exp_out, "Subset")
    m = list(DIMS)[1]
    assert torch.equal(subset[K.layer2_key(m, 0)], state[K.layer2_key(m, 2)])
    # An entry is a single-expert state that PEFT export takes as it is.
    from colm.formats.peft_adapters import export_expert

    export_expert(L.read_weights(entries[1]), str(tmp_path / "peft" / "ToyTopic"), what=entries[1])
    assert sorted(os.listdir(tmp_path / "peft" / "ToyTopic")) == [CONFIG_FILE, WEIGHTS_FILE]
    # Without experts.json, names come from a setting's order or the names given; counts must match.
    os.remove(directory / layout.EXPERTS_FILE)
    with pytest.raises(ValueError, match="holds 3 experts but the setting 'Toy' names 8"):
        lib.split_checkpoint(str(directory / "best.pt"), str(tmp_path / "lib2"), setting="Toy")
    with pytest.raises(FileExistsError, match="nothing written"):
        lib.split_checkpoint(str(directory / "best.pt"), str(library), names=["X", "ToyTopic", "Y"])
    assert not (library / "X").exists()
    entries = lib.split_checkpoint(str(directory / "best.pt"), str(tmp_path / "lib2"), names=["P", "Q", "R"])
    assert L.read_metadata(entries[0])["scope"] == "P"


def test_methods_that_start_from_a_concatenation_work_from_library_entries(exp_out, tmp_path):
    """Arrow, Merged Experts and Retrieval on a concatenation of library entries give what they give on the classic
    concatenation; Average Activation's router vectors travel through the library unchanged."""
    write_experts(exp_out, NAMES[:3])
    library = tmp_path / "library"
    add_all(exp_out, library, NAMES[:3])
    C.run_concatenate(datasets=NAMES[:3], suffix="lora_gate", out_path="Classic")
    C.run_concatenate(datasets=NAMES[:3], library=str(library), out_path="Lib")

    def same(a, b):
        a = {k: v for k, v in a.items() if not K.is_embedding_key(k)}
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for source in ("Classic", "Lib"):
        router_from_weights.create_router_embeddings_from_weights(source, f"{source}Arrow", "top1_eigen_weighted_vector")
        merging.average_outer_product_lora_weights(source, f"{source}Merged")
    assert same(read_out(exp_out, "ClassicArrow"), read_out(exp_out, "LibArrow"))
    assert same(read_out(exp_out, "ClassicMerged"), read_out(exp_out, "LibMerged"))
    # Retrieval packs each expert's library of sentence embeddings into encoder router vectors, in setting order.
    embeddings = tmp_path / "exp_out" / "embeddings"
    embeddings.mkdir()
    for i, scope in enumerate(get_setting(NAMES[:3], check_scopes=False).values()):
        np.save(layout.retrieval_library_file("embeddings", scope, 4), np.full((4, 6), float(i), dtype=np.float32))
    for source in ("Classic", "Lib"):
        retrieval.make_checkpoint_for_retrieval(source, "embeddings", f"{source}Retrieval", 4, NAMES[:3])
    assert same(read_out(exp_out, "ClassicRetrieval"), read_out(exp_out, "LibRetrieval"))
    # Average Activation: averages written as router vectors of a per-expert checkpoint, then added and concatenated.
    no_gate = write_experts(exp_out, NAMES[:2], suffix="lora", gate=False, zero_router=True)
    for seed, name in enumerate(NAMES[:2]):
        averages = {m: torch.full((d_in,), float(seed + 1)) for m, (d_in, _) in DIMS.items()}
        write_checkpoint(insert_averaged_hiddens_state(no_gate[name], averages),
                         str(exp_out / layout.expert_path(name, "lora") / "best.pt"))
    add_all(exp_out, tmp_path / "avg_library", NAMES[:2], suffix="lora")
    assert L.read_metadata(str(tmp_path / "avg_library" / NAMES[0]))["router_vectors"] == "set"
    C.run_concatenate(datasets=NAMES[:2], suffix="lora", out_path="ClassicAvg")
    C.run_concatenate(datasets=NAMES[:2], library=str(tmp_path / "avg_library"), out_path="LibAvg")
    assert same(read_out(exp_out, "ClassicAvg"), read_out(exp_out, "LibAvg"))
    assert torch.equal(read_out(exp_out, "LibAvg")[K.router_key(list(DIMS)[0], 1)], torch.full((8,), 2.0))


def test_evaluation_loads_an_entry_and_a_library_concatenation_into_the_tiny_t5(tmp_path, monkeypatch):
    import gin
    from conftest import write_random_moe_checkpoint

    from colm import registry
    from colm.ginparse import parse_gin
    from colm.moma.weights import load_weights

    monkeypatch.chdir(REPO_ROOT)  # the model gins name the embedded T5 by its path in the repository
    monkeypatch.setattr(layout, "EXP_OUT", str(tmp_path / "exp_out"))
    released = tmp_path / "released" / "best.pt"
    write_random_moe_checkpoint(released, n_experts=3)
    library = tmp_path / "library"
    entries = lib.split_checkpoint(str(released), str(library), names=["E0", "E1", "E2"], model_type="tiny")
    C.run_concatenate(datasets=["E2", "E0"], library=str(library), out_path="E2E0")
    original = read_checkpoint(str(released))
    for gin_file, path, index in (("moe_lora_rank16_single.gin", os.path.join(entries[1], L.WEIGHTS_FILE), 1),
                                  ("moe_lora_rank16_a2.gin", str(tmp_path / "exp_out" / "E2E0" / "best.pt"), 2)):
        gin.clear_config()
        registry.reset()
        parse_gin(["colm/models/tiny/t5.gin", f"colm/models/tiny/{gin_file}"], ["M/MODEL/Model.device='cpu'"])
        model = registry.get_object("M/MODEL")
        load_weights(model, weight_path=path)
        own = model.torch_model.state_dict()
        key = next(k for k in original if K.is_expert_key(k) and k.endswith("__0"))
        assert torch.equal(own[key], original[K.parse_indexed(key).with_index(index).key])
        batch = model.tokenizer(["a short input"], return_tensors="pt")
        with torch.no_grad():
            logits = model.torch_model(**batch, decoder_input_ids=batch["input_ids"][:, :2]).logits
        assert torch.isfinite(logits).all()


def test_command_lines(exp_out, tmp_path, capsys):
    write_experts(exp_out, NAMES[:2])
    library = str(tmp_path / "library")
    cli = runpy.run_path(os.path.join(REPO_ROOT, "scripts/expert_library.py"))
    for name in NAMES[:2]:
        assert cli["main"](["add", library, name, "--checkpoint", layout.expert_path(name, "lora_gate")]) == 0
    assert L.read_metadata(os.path.join(library, NAMES[0]))["command"] == (
        f"python scripts/expert_library.py add {library} {NAMES[0]} --checkpoint "
        f"{layout.expert_path(NAMES[0], 'lora_gate')}")
    assert cli["main"](["list", library]) == 0
    listed = capsys.readouterr().out
    assert f"{NAMES[1]}\tscope=TOYREVERSE\trank={R}\trouter_vectors=set" in listed and "2 entries" in listed
    assert run_cli(["--gin_bindings", f'run_concatenate.datasets=["{NAMES[1]}", "{NAMES[0]}"]',
                    f'run_concatenate.library="{library}"', 'run_concatenate.out_path="Both"'],
                   default_func="run_concatenate") == 0
    assert [e["name"] for e in read_experts_file(str(exp_out / "Both" / layout.EXPERTS_FILE))] == NAMES[1::-1]
    assert cli["main"](["split", str(tmp_path / "lib2"), "--checkpoint", "Both"]) == 0
    assert sorted(os.listdir(tmp_path / "lib2")) == sorted(NAMES[:2])
    assert cli["main"](["add", library, NAMES[0], "--checkpoint", layout.expert_path(NAMES[0], "lora_gate")]) == 1
    assert "exists" in capsys.readouterr().err
