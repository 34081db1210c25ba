"""The procedures besides training and evaluation under torchrun (docs/distributed.md, "Not covered"):

- calibration (centred routing's router input means) shards its batches over the ranks and adds up the ranks'
  float64 sums and token counts, so its means are the single process's up to float64 rounding; rank 0 alone
  writes the calibrated checkpoint;
- SaveAveragedHiddens (Average Activation) runs inside the Evaluator, which runs analysis processors on rank 0
  alone: the file is the single process's, written once;
- the Retriever and insert_averaged_hiddens run on rank 0 alone while the other ranks wait.

The fast tests fake the ranks in one process (the collectives replaced by their results); the slow ones run
`torchrun --standalone --nproc_per_node=2` on CPU (gloo) against one process, as tests/test_distributed.py does.
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, subprocess_env
from safetensors.torch import load_file

from colm.procedures import calibration, retriever
from colm.utils import distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_calibration import DATA, ListDataset, routed_model  # noqa: E402

# Calibration sums in float64 and rounds the means to float32 at the end: adding the ranks' partial sums in
# another order moves a mean by about 1e-16 relative, far under float32's last bit; 1e-6 is a safe margin.
MEAN_TOLERANCE = 1e-6


def datasets_of(batch_size=2):
    return [ListDataset(name, pairs, batch_size=batch_size) for name, pairs in DATA.items()]


def fake_ranks(monkeypatch, rank, world):
    """This process acts as `rank` of `world` for colm.utils.distributed's questions (no process group)."""
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "is_distributed", lambda: world > 1)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_calibration_sums_to_the_single_process_means(monkeypatch, world):
    """Every rank's share (3 and 4 examples in batches of 2: with 3 ranks, rank 2 gets no batch of D/A), added up
    as combine_rank_sums does, gives the single process's means; every rank makes the same two collective calls."""
    model = routed_model()
    captured = []
    monkeypatch.setattr(distributed, "gather_to_main", lambda local: captured.append(local) or [local])
    single, used = calibration.measure_router_input_means(model, datasets_of(), num_examples=10)
    assert used == {"D/A/TRAIN": 3, "D/B/TRAIN": 4}

    shards, calls = [], []
    for rank in range(world):
        fake_ranks(monkeypatch, rank, world)

        def gather(local, rank=rank):
            calls.append((rank, "gather"))
            shards.append(local)
            return [local] if rank == 0 else None  # rank 0 combines what it has; the fake broadcast drops it

        def broadcast(obj, rank=rank):
            calls.append((rank, "broadcast"))
            return captured[0]  # stands for rank 0's answer; only the shards matter here

        monkeypatch.setattr(distributed, "gather_to_main", gather)
        monkeypatch.setattr(distributed, "broadcast_from_main", broadcast)
        calibration.measure_router_input_means(model, datasets_of(), num_examples=10)
    assert calls == [(r, c) for r in range(world) for c in ("gather", "broadcast")]
    if world == 3:
        assert shards[2][0] == ({}, {})  # rank 2 ran no batch of D/A/TRAIN (2 batches) and still took part

    fake_ranks(monkeypatch, 0, world)
    monkeypatch.setattr(distributed, "gather_to_main", lambda local: shards)
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda obj: obj)
    combined = calibration.combine_rank_sums(shards[0])
    per_dataset = [{m: s[m] / c[m] for m in s} for s, c in combined]
    means = {m: torch.stack([d[m] for d in per_dataset]).mean(dim=0).float() for m in single}
    assert means.keys() == single.keys()
    difference = max(float((means[m] - single[m]).abs().max()) for m in single)
    assert difference <= MEAN_TOLERANCE


def test_combine_rank_sums_in_one_process_is_the_identity():
    local = [({"m": torch.tensor([1.0, 2.0], dtype=torch.float64)}, {"m": 3.0}), ({}, {})]
    combined = calibration.combine_rank_sums(local)
    assert len(combined) == 2 and torch.equal(combined[0][0]["m"], local[0][0]["m"]) and combined[0][1] == {"m": 3.0}
    assert combined[1] == ({}, {})


def test_retriever_runs_on_rank_0_alone(monkeypatch, tmp_path):
    made = retriever.Retriever("P/RETRIEVE", datasets=[], include_answer_choices=True, make_expert_library=False,
                               expert_library_dir=str(tmp_path), dataset_length=10)
    ran = []
    monkeypatch.setattr(made, "_run", lambda: ran.append(distributed.rank()) or {"votes": "rank 0's"})
    monkeypatch.setattr(distributed, "broadcast_from_main", lambda obj: {"votes": "rank 0's"})
    for rank in (1, 0):
        fake_ranks(monkeypatch, rank, 2)
        assert made.run() == {"votes": "rank 0's"}
    assert ran == [0]


# ----------------------------------------------------------------------------------------------- torchrun (slow)

def launch(cwd, argv, nproc=1, **env_extra):
    env = subprocess_env(cwd)
    env.update(OMP_NUM_THREADS="1", **env_extra)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    done = subprocess.run([*launcher, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_torchrun_calibration_writes_the_single_process_means_once(in_tmp_repo):
    from collections import OrderedDict

    from conftest import write_random_moe_checkpoint
    from test_calibration import toy_train_scopes

    from colm.formats.checkpoint_io import read_checkpoint
    from colm.formats.experts_file import write_experts_file

    scopes = toy_train_scopes()
    source = in_tmp_repo / "exp_out" / "moe" / "best.pt"
    source.parent.mkdir(parents=True)
    write_random_moe_checkpoint(source, n_experts=3)
    write_experts_file(str(source.parent), OrderedDict([("E0", "S0"), ("E1", "S1"), ("E2", "S2")]))
    # 5 examples per dataset in batches of 2: 3 batches, 2 on rank 0 and 1 on rank 1.
    common = ["--datasets", *scopes, "--num_examples", "5", "--model_type", "tiny", "--gin_bindings",
              "D/ToyDataset.batch_size=2"]
    script = os.path.join(REPO_ROOT, "scripts/calibrate_routers.py")
    one = launch(in_tmp_repo, [script, "--exp_name", "moe", "--out_path", "moe_one", *common])
    two = launch(in_tmp_repo, [script, "--exp_name", "moe", "--out_path", "moe_two", *common], nproc=2)
    assert "2 processes, backend gloo" in two.stdout
    assert "calibration: 2 processes, rank r measures batches r, r + 2" in two.stdout
    assert one.stdout.count("[colm] calibration: input means of") == 1
    assert two.stdout.count("[colm] calibration: input means of") == 1  # rank 0 alone writes
    a = read_checkpoint(str(in_tmp_repo / "exp_out/moe_one/best.pt"))
    b = read_checkpoint(str(in_tmp_repo / "exp_out/moe_two/best.pt"))
    assert a.keys() == b.keys()
    means = [k for k in a if k.endswith("._addons.router.input_mean")]
    assert means and all(a[k].abs().sum() > 0 for k in means)
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"calibration: max |mean_torchrun - mean_single| = {difference:.3g}")
    assert difference <= MEAN_TOLERANCE
    assert (in_tmp_repo / "exp_out/moe_two/experts.json").is_file()
    assert (in_tmp_repo / "exp_out/moe_two/calibration.json").read_text().replace("moe_two", "moe_one") == \
        (in_tmp_repo / "exp_out/moe_one/calibration.json").read_text().replace("moe_two", "moe_one")


@pytest.mark.slow
def test_torchrun_averaged_hiddens_are_the_single_process_ones_written_once(in_tmp_repo, make_model):
    import shutil

    from colm.checkpoints.experts import put_index_to_lora
    from colm.datasets.settings import get_setting
    from colm.formats.checkpoint_io import write_checkpoint
    from colm.moma.lora import modify_with_lora

    lora = make_model([lambda m: modify_with_lora(m, lora_modules=".*SelfAttention|.*EncDecAttention|.*DenseReluDense",
                                                  lora_layers="q|k|v|o|w.*")])
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.3
             for k, v in lora.torch_model.state_dict().items() if "expert_lora" in k}
    write_checkpoint(state, "exp_out/expert_lora/best.pt")
    put_index_to_lora(path="expert_lora", out_path="one")
    shutil.copytree(in_tmp_repo / "exp_out/one", in_tmp_repo / "exp_out/two")
    scope = get_setting(["ToySentiment"])["ToySentiment"]
    command = ["bash", "colm/experiments/bash_scripts/reinit_router_embedding.sh", "-dataset", scope, "-arch", "A2",
               "-compute_hiddens", "True", "-hiddens_suffix", "_a2", "-extra_bindings",
               # 10 examples in batches of 4: 3 batches (all on rank 0 under torchrun, see the module docstring)
               "main.logging_backend=None D/ToyDataset.num_examples=10 D/ToyDataset.batch_size=4"]
    env = subprocess_env(in_tmp_repo)
    env.update(OMP_NUM_THREADS="1")
    done = {}
    for name, torchrun in (("one", ""), ("two", "--standalone --nproc_per_node=2")):
        done[name] = subprocess.run([*command[:2], "-exp_name", name, *command[2:]], cwd=in_tmp_repo,
                                    env={**env, "COLM_TORCHRUN": torchrun}, capture_output=True, text=True,
                                    timeout=600)
        assert done[name].returncode == 0, done[name].stdout[-2000:] + done[name].stderr[-3000:]
    assert "2 processes, backend gloo" in done["two"].stdout
    assert done["two"].stdout.count("[colm] SaveAveragedHiddens:") == 1  # written once, by rank 0
    assert "averaged every batch alone" in done["two"].stdout
    file = f"averaged_hiddens_a2/D_{scope.replace('/', '_')}_TRAIN.safetensors"
    a, b = (load_file(str(in_tmp_repo / "exp_out" / name / file)) for name in ("one", "two"))
    assert a.keys() == b.keys() and a
    difference = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"averaged hiddens: max |avg_torchrun - avg_single| = {difference:.3g}")
    assert difference <= MEAN_TOLERANCE
