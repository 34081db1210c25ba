"""Data parallelism under torchrun on CPU (gloo): the weights of 2 ranks x B/2 equal one process with batch B, the
sharded evaluation writes the single process's results.txt, a killed torchrun run resumes, FSDP (one unit per
transformer block) trains alike and writes the single process's checkpoint keys (issue 16; docs/distributed.md).
One test, so the four runs share the single-process reference (about 3 minutes on two shared cores). A second
one kills an FSDP run and resumes it, under FSDP and in one process; a fast one wraps the tiny T5 with FSDP in a
process group of one and checks the names that leave it.

Why a tolerance and not bit-for-bit: one process sums the gradient of the whole batch inside one backward, where
two ranks each sum their half and gloo adds the two halves; float32 addition is not associative, so the last bits
of the gradient differ (about 1e-7 relative) and SGD carries that difference into the weights. The tolerance
below is far under the weights' change in training, so a wrong batch split or a wrong average would fail it.
"""

import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings

import gin
import pytest
import torch
from conftest import REPO_ROOT, subprocess_env

from colm import registry
from colm.formats.checkpoint_io import read_checkpoint
from colm.ginparse import parse_gin
from colm.main import main as _main  # noqa: F401  (registers the main configurable the gin files bind)
from colm.procedures import resume
from colm.utils import distributed, run_dir

GINS = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
        "colm/experiments/train_single_task_loralinear.gin"]
# 16 examples in configured batches of 4 (2 per rank under 2 processes), 2 micro-batches a step: 4 steps cross an
# epoch boundary. 10 evaluation examples in batches of 4: 3 batches, 2 on rank 0 and 1 on rank 1.
# SGD: Adam divides each gradient by its own running magnitude, which turns the rounding noise of the LoRA A
# matrices' near-zero first gradients (B starts at zero) into steps of the learning rate's size.
BINDINGS = ['P/TRAIN/Trainer.datasets="D/TOYSENTIMENT/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYSENTIMENT/EVAL"',
            "D/ToyDataset.batch_size=4", "D/TOYSENTIMENT/TRAIN/ToyDataset.num_examples=16",
            "D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=10", "P/TRAIN/Trainer.gradient_accumulation_factor=2",
            "P/TRAIN/Trainer.num_steps=4", "P/TRAIN/Trainer.checkpoint_step_interval=2",
            'P/TRAIN/get_optimizer.optimizer_class="sgd"', "P/TRAIN/get_optimizer.learning_rate=0.5",
            "main.logging_backend=None"]
TOLERANCE = 1e-5  # max |w_torchrun - w_single|; the weights move by about 1e-2 in these 4 steps


def run(cwd, exp_name, nproc=1, extra=(), script=None, timeout=600, **env_extra):
    env = subprocess_env(cwd)
    env.update(EXP_NAME=exp_name, OMP_NUM_THREADS="1", **{k: str(v) for k, v in env_extra.items()})
    target = [script] if script else ["-m", "colm.main"]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    # A session of its own: a run that times out is killed with its torchrun workers, not just torchrun.
    process = subprocess.Popen([*launcher, *target, "--gin_files", *GINS, "--gin_bindings", *BINDINGS, *extra],
                               cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{exp_name}: no exit within {timeout} s (killed); stdout ends:\n{stdout[-2000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def max_difference(path_a, path_b):
    a, b = read_checkpoint(str(path_a)), read_checkpoint(str(path_b))
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process_resume_and_fsdp(in_tmp_repo):
    out = in_tmp_repo / "exp_out"
    single = run(in_tmp_repo, "single")
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run(in_tmp_repo, "ddp", nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 processes, backend gloo" in ddp.stdout
    assert ddp.stdout.count("saved 144 tensors to exp_out/ddp/finish.pt") == 1  # rank 0 alone writes

    # Same effective batch: the weights agree to float32 reduction order (module docstring).
    trained = read_checkpoint(str(out / "single/finish.pt"))
    # LoRA's B matrices start at zero: their size now is how far training moved them.
    moved = max(float(v.abs().max()) for k, v in trained.items() if k.endswith("lora_b"))
    difference = max_difference(out / "single/finish.pt", out / "ddp/finish.pt")
    print(f"DDP: max |w_torchrun - w_single| = {difference:.3g}; training moved B by up to {moved:.3g}")
    assert difference < TOLERANCE < moved / 100
    # The sharded evaluation scores as one process does, into the same results.txt.
    assert (out / "ddp/results.txt").read_text() == (out / "single/results.txt").read_text()
    assert run_dir.read_status(str(out / "ddp"))["status"] == "complete"

    # Killed by SIGKILL before step 3 (resume.pt holds step 2), then the same torchrun command resumes on both
    # ranks and ends bit for bit where the uninterrupted torchrun run ended (same ranks, same reduction order).
    killed = run(in_tmp_repo, "killed", nproc=2, script=os.path.join(REPO_ROOT, "tests/kill_runner.py"),
                 COLM_TEST_KILL_AT_STEP=3)
    assert killed.returncode != 0
    payload = resume.read_resume(str(out / "killed/resume.pt"))
    assert payload["step"] == 2 and len(payload["rng_ranks"]) == 2
    resumed = run(in_tmp_repo, "killed", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2/4" in resumed.stdout
    assert run_dir.read_status(str(out / "killed"))["status"] == "complete"
    a, b = read_checkpoint(str(out / "ddp/finish.pt")), read_checkpoint(str(out / "killed/finish.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # FSDP (Trainer.data_parallel="fsdp") shards each transformer block as a unit of its own (the tiny T5 has 4
    # encoder and 4 decoder blocks, plus the root unit), writes its step-2 resume.pt on the way, and trains on CPU
    # with gloo to the same weights under the single process's checkpoint keys.
    fsdp = run(in_tmp_repo, "fsdp", nproc=2, extra=['P/TRAIN/Trainer.data_parallel="fsdp"'])
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    units = re.search(r"FSDP: (\d+) units, (\d+) transformer blocks \(T5Block\)", fsdp.stdout)
    assert units and (int(units[1]), int(units[2])) == (9, 8), fsdp.stdout[-3000:]
    assert "_fsdp_wrapped_module" not in fsdp.stdout + fsdp.stderr
    assert "requires_grad=True and False" not in fsdp.stderr  # FSDP's per-block warning, replaced by one line
    assert fsdp.stdout.count("saved 144 tensors to exp_out/fsdp/finish.pt") == 1
    for name in ("finish.pt", "best.pt"):
        assert read_checkpoint(str(out / "fsdp" / name)).keys() == trained.keys()
    difference = max_difference(out / "single/finish.pt", out / "fsdp/finish.pt")
    print(f"FSDP: max |w_torchrun - w_single| = {difference:.3g}")
    assert difference < TOLERANCE
    assert run_dir.read_status(str(out / "fsdp"))["status"] == "complete"


# AdamW, so that the optimiser state (sharded under FSDP) matters to every step after the resume.
ADAMW = ['P/TRAIN/Trainer.data_parallel="fsdp"', 'P/TRAIN/get_optimizer.optimizer_class="adamw"',
         "P/TRAIN/get_optimizer.learning_rate=0.005"]


@pytest.mark.slow
def test_fsdp_killed_run_resumes_to_the_bits_of_an_uninterrupted_one(in_tmp_repo):
    out = in_tmp_repo / "exp_out"
    whole = run(in_tmp_repo, "fsdp_whole", nproc=2, extra=ADAMW)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = run(in_tmp_repo, "fsdp_killed", nproc=2, extra=ADAMW,
                 script=os.path.join(REPO_ROOT, "tests/kill_runner.py"), COLM_TEST_KILL_AT_STEP=3)
    assert killed.returncode != 0
    payload = resume.read_resume(str(out / "fsdp_killed/resume.pt"))
    assert payload["step"] == 2 and len(payload["rng_ranks"]) == 2
    # The single process's layout: whole tensors under the plain names, the optimiser state keyed by parameter
    # index in the order of the parameters, as optimizer.state_dict() writes it.
    params = list(payload["params"].items())
    assert [name for name, _ in params] == list(read_checkpoint(str(out / "fsdp_whole/finish.pt")))
    optimizer = payload["optimizer"]
    assert [group["params"] for group in optimizer["param_groups"]] == [list(range(len(params)))]
    assert sorted(optimizer["state"]) == list(range(len(params)))
    assert all(optimizer["state"][i]["exp_avg"].shape == value.shape for i, (_, value) in enumerate(params))
    shutil.copytree(out / "fsdp_killed", out / "one_process")  # for the single process below

    resumed = run(in_tmp_repo, "fsdp_killed", nproc=2, extra=ADAMW)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2/4" in resumed.stdout
    assert run_dir.read_status(str(out / "fsdp_killed"))["status"] == "complete"
    # Same ranks, same reduction order: bit for bit (restoring the weights but not the optimiser state would move
    # them by about 1e-2 here).
    a, b = read_checkpoint(str(out / "fsdp_whole/finish.pt")), read_checkpoint(str(out / "fsdp_killed/finish.pt"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # One process resumes the FSDP run's file. Not to the bits: its batch sums differ in the last bits, which
    # AdamW amplifies (module docstring; about 5e-4 here), where losing the optimiser state costs about 2e-2.
    alone = run(in_tmp_repo, "one_process", extra=ADAMW)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert "resumed at step 2/4" in alone.stdout and "written by 2 process(es), this run has 1" in alone.stdout
    moved = max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_b"))
    difference = max_difference(out / "fsdp_whole/finish.pt", out / "one_process/finish.pt")
    print(f"FSDP resumed by one process: max |w - w_fsdp| = {difference:.3g}; training moved B by up to {moved:.3g}")
    assert difference < moved / 10


@pytest.mark.slow
def test_fsdp_on_a_generation_task_validates_and_finishes(in_tmp_repo):
    """Validation generates text on each rank's shard (2 batches on rank 0, 1 on rank 1). transformers' generate
    turns on synced_gpus for a module FSDP manages, so each rank waited in an all-reduce for the other's extra
    decoding steps, and a rank with one batch fewer never came: the run hung after its last step. Our generation
    always runs on whole parameters, so it generates unsynced."""
    generation = ['P/TRAIN/Trainer.datasets="D/TOYINSTRUMENT/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYINSTRUMENT/EVAL"',
                  "D/TOYINSTRUMENT/TRAIN/ToyDataset.num_examples=16", "D/TOYINSTRUMENT/EVAL/ToyDataset.num_examples=10",
                  'P/TRAIN/Trainer.data_parallel="fsdp"', "P/TRAIN/Trainer.num_steps=2",
                  "P/TRAIN/Trainer.checkpoint_step_interval=None"]
    done = run(in_tmp_repo, "fsdp_generation", nproc=2, extra=generation, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP: 9 units" in done.stdout and "exact_match" in (in_tmp_repo / "exp_out/fsdp_generation/results.txt").read_text()
    assert run_dir.read_status(str(in_tmp_repo / "exp_out/fsdp_generation"))["status"] == "complete"


@pytest.fixture
def process_group_of_one():
    """A gloo process group of this process alone (distributed.is_distributed() stays False)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_wraps_each_block_and_hands_out_single_process_names(make_model, process_group_of_one):
    from colm.moma.lora import modify_with_lora
    from colm.procedures import fsdp

    lora = functools.partial(modify_with_lora, lora_modules="lora_hosts", lora_layers="lora_children")
    model = make_model([lora], trainable_params=".*lora.*")
    names = [name for name, _ in model.named_trainable_parameters()]
    keys = list(model.torch_model.state_dict())
    assert sorted(fsdp.block_modules(model)) == [f"{stack}.block.{i}" for stack in ("decoder", "encoder") for i in range(4)]
    optimizer = torch.optim.AdamW([p for _, p in model.named_trainable_parameters()], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP's NO_SHARD notice for a world of one
        root, message = fsdp.wrap(model, torch.device("cpu"), name="P/TRAIN")
        assert fsdp.count_units(root) == 9 and "9 units, 8 transformer blocks (T5Block)" in message
        assert any("_fsdp_wrapped_module" in name for name, _ in model.named_trainable_parameters())
        for param in optimizer.param_groups[0]["params"]:
            param.grad = torch.ones_like(param)
        optimizer.step()
        state = fsdp.trainable_state(root, model)
        assert list(state) == names
        saved = fsdp.optimizer_state(root, optimizer)
        assert saved["param_groups"][0]["params"] == list(range(len(names))) and sorted(saved["state"]) == list(
            range(len(names)))
        with fsdp.full_model(root, model.torch_model):
            assert list(model.torch_model.state_dict()) == keys
        fsdp.load_optimizer_state(root, optimizer, saved)
        fsdp.unwrap(root, model.torch_model)
    assert list(model.torch_model.state_dict()) == keys
    assert [name for name, _ in model.named_trainable_parameters()] == names
    assert all(torch.equal(p, state[n]) for n, p in model.named_trainable_parameters())


def test_fsdp_blocks_of_a_decoder_only_model_and_of_an_unknown_one():
    from types import SimpleNamespace

    from colm.models.toy_llama import make_model
    from colm.procedures import fsdp

    llama = make_model(vocab_size=32, num_hidden_layers=2)
    blocks = fsdp.block_modules(SimpleNamespace(torch_model=llama, architecture="llama"))
    assert list(blocks) == ["model.layers.0", "model.layers.1"]
    assert {type(m).__name__ for m in blocks.values()} == {"LlamaDecoderLayer"}
    # Names the architecture facts do not know: transformers' _no_split_modules finds the blocks.
    wrapper = torch.nn.Module()
    wrapper.inner = llama
    wrapper._no_split_modules = llama._no_split_modules
    assert list(fsdp.block_modules(SimpleNamespace(torch_model=wrapper, architecture="llama"))) == [
        "inner.model.layers.0", "inner.model.layers.1"]


def build_trainer(bindings):
    gin.clear_config()
    registry.reset()
    parse_gin(GINS, BINDINGS + ["P/TRAIN/Trainer.output_dir=None", "M/MODEL/Model.device='cpu'", *bindings])
    return registry.get_object("P/TRAIN")


def test_refusals_name_the_binding(monkeypatch, in_tmp_repo):
    monkeypatch.setenv("EXP_NAME", "refused")
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(ValueError, match=r"bind D/TOYSENTIMENT/TRAIN/ToyDataset.batch_size to a multiple of 3"):
        build_trainer([])
    with pytest.raises(ValueError, match="data_parallel='zero'"):
        from colm.procedures.trainer import Trainer

        Trainer("P/TRAIN", model="M/MODEL", datasets="D/X", batcher=None, data_parallel="zero")


def test_batcher_split_and_stride_partition_the_plan():
    from test_batchers import NumberDataset, numbers, single

    batcher, data = single(shuffle=True, drop_last=True), NumberDataset("n", 12, 4)
    whole = [numbers(b) for b in batcher.iterate([data], epoch=1)]
    halves = [[numbers(b) for b in batcher.iterate([data], epoch=1, split=(r, 2))] for r in range(2)]
    assert [h0 + h1 for h0, h1 in zip(*halves)] == whole
    strided = [[numbers(b) for b in batcher.iterate([data], epoch=1, stride=(r, 2))] for r in range(2)]
    assert strided == [whole[0::2], whole[1::2]]
    with pytest.raises(ValueError, match="to a multiple of 3"):
        batcher.check_split([data], 3)
