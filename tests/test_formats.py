"""colm/formats: the exp_out/ layout, checkpoint files by experiment path, and the ground-floor import rule."""

import ast
import os

import pytest
import torch

from colm.formats import checkpoint_io, layout

FORMATS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colm", "formats")


def test_layout_names_the_files_the_original_wrote():
    assert layout.checkpoint_file("datasets_concatenated/X_lora") == "exp_out/datasets_concatenated/X_lora/best.pt"
    assert layout.expert_path("P3Agnews", "t5xl_lora") == "datasets_concatenated/P3Agnews_t5xl_lora"
    assert layout.hiddens_file("datasets_concatenated/X_lora", "D/TOYX/TRAIN") == (
        "exp_out/datasets_concatenated/X_lora/averaged_hiddens_a2/D_TOYX_TRAIN.safetensors")
    name = layout.retrieval_library_name("FLANV2BOOLQ/ZS", 1000)
    assert name == "D_FLANV2BOOLQ_ZS_TRAIN_K1000_embeddings.npy"
    assert layout.retrieval_library_file("lib", "FLANV2BOOLQ/ZS", 1000) == os.path.join("exp_out", "lib", name)
    assert layout.retrieval_library_dataset(os.path.join("any", name)) == "D_FLANV2BOOLQ_ZS_TRAIN"
    assert layout.numbered_file("exp_out/x/weights.pt", 12) == "exp_out/x/weights.12.pt"


def test_numbered_files_finds_only_numbered_siblings(tmp_path):
    for name in ("weights.pt", "weights.0.pt", "weights.2.pt", "weights.10.pt", "weights.x.pt", "other.3.pt"):
        (tmp_path / name).write_bytes(b"")
    found = checkpoint_io.numbered_files(str(tmp_path / "weights.pt"))
    assert found == {n: str(tmp_path / f"weights.{n}.pt") for n in (0, 2, 10)}


def test_experiment_checkpoints_round_trip_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "EXP_OUT", str(tmp_path))
    state = {"a._addons.router.expert_embeddings__0": torch.arange(3.0)}
    file = checkpoint_io.write_experiment(state, "runs/one")
    assert file == str(tmp_path / "runs/one/best.pt") and os.listdir(tmp_path / "runs/one") == ["best.pt"]
    assert torch.equal(checkpoint_io.read_experiment("runs/one")["a._addons.router.expert_embeddings__0"],
                       torch.arange(3.0))
    with pytest.raises(FileNotFoundError, match="runs/two/best.pt does not exist"):
        checkpoint_io.read_experiment("runs/two")


def test_formats_import_nothing_of_colm_but_utils_and_itself():
    for name in sorted(os.listdir(FORMATS_DIR)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(FORMATS_DIR, name)) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                if module == "colm" or module.startswith("colm."):
                    assert module.startswith(("colm.utils", "colm.formats")), f"colm/formats/{name} imports {module}"
