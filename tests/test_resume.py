"""Preemption: a killed training run resumes bit for bit, a finished result is never destroyed, and the
launcher's run stops with it (issue 12; docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import time

import gin
import pytest
import torch
from conftest import REPO_ROOT, subprocess_env

from colm import registry
from colm.formats.checkpoint_io import read_checkpoint
from colm.ginparse import parse_gin
from colm.main import main
from colm.procedures import resume
from colm.procedures.results import read_results
from colm.utils import run_dir

GINS = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
        "colm/experiments/train_single_task_loralinear.gin"]
# 20 training examples in batches of 4: 5 batches an epoch, so the checkpoints at steps 4 and 8 sit mid-epoch
# and the 12 steps cross two epoch boundaries.
SMALL = ['P/TRAIN/Trainer.datasets="D/TOYSENTIMENT/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYSENTIMENT/EVAL"',
         "D/ToyDataset.batch_size=4", "D/TOYSENTIMENT/TRAIN/ToyDataset.num_examples=20",
         "D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=8", "P/TRAIN/Trainer.gradient_accumulation_factor=1",
         "main.logging_backend=None"]
RESUMABLE = SMALL + ["P/TRAIN/Trainer.num_steps=12", "P/TRAIN/Trainer.validation_step_interval=6",
                     "P/TRAIN/Trainer.checkpoint_step_interval=4", "P/TRAIN/Trainer.report_step_interval=3"]


def run_training(cwd, exp_name, **faults):
    """The same training command each time, through tests/kill_runner.py (dropout 0.1, so the RNG matters)."""
    env = subprocess_env(cwd)
    env.update(EXP_NAME=exp_name, COLM_TEST_DROPOUT="0.1", **{k: str(v) for k, v in faults.items()})
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tests/kill_runner.py"), "--gin_files", *GINS,
                           "--gin_bindings", *RESUMABLE], cwd=cwd, env=env, capture_output=True, text=True)


def same_tensors(path_a, path_b):
    a, b = read_checkpoint(str(path_a)), read_checkpoint(str(path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_runs_resume_to_the_bits_of_an_uninterrupted_run(in_tmp_repo):
    out = in_tmp_repo / "exp_out"
    whole = run_training(in_tmp_repo, "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    # 1. SIGKILL mid-run, at step 6: the resume checkpoint of step 4 is there, the run is marked unfinished.
    killed = run_training(in_tmp_repo, "killed", COLM_TEST_KILL_AT_STEP=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert resume.read_resume(str(out / "killed/resume.pt"))["step"] == 4
    assert run_dir.read_status(str(out / "killed"))["status"] == "running"
    assert not (out / "killed/finish.pt").exists()

    # 2. The same command resumes from step 4 and is SIGKILLed while writing the step-8 resume checkpoint:
    #    a half-written temporary file is left, resume.pt still holds step 4.
    killed = run_training(in_tmp_repo, "killed", COLM_TEST_KILL_IN_SAVE=1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "resumed at step 4/12" in killed.stdout
    orphans = list((out / "killed").glob(".tmp-resume.pt-*"))
    assert len(orphans) == 1
    assert resume.read_resume(str(out / "killed/resume.pt"))["step"] == 4

    # 3. The same command once more: the orphan is removed, training resumes at step 4 and completes.
    done = run_training(in_tmp_repo, "killed")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed 1 temporary file(s)" in done.stdout and "resumed at step 4/12" in done.stdout
    assert "step-0 evaluation skipped" in done.stdout
    assert not list((out / "killed").glob(".tmp-*")) and not (out / "killed/resume.pt").exists()
    assert run_dir.read_status(str(out / "killed"))["status"] == "complete"

    # Bit for bit: the final weights, the best weights and the last validation.
    assert same_tensors(out / "whole/finish.pt", out / "killed/finish.pt")
    assert same_tensors(out / "whole/best.pt", out / "killed/best.pt")
    last = [read_results(str(out / name / "results_in_training.txt"))[-1][1] for name in ("whole", "killed")]
    assert last[0] == last[1]
    # The step-0 evaluation ran once (before the first kill), labelled as such; the final one once.
    headers = [h for h, _ in read_results(str(out / "killed/results.txt"))]
    assert headers == ["Before training (step 0)", "Final results"]


def _train_in_process(exp_name, *extra):
    gin.clear_config()
    registry.reset()
    parse_gin(GINS, SMALL + [f'main.exp_name="{exp_name}"', "P/TRAIN/Trainer.num_steps=2"] + list(extra))
    return main()


def test_rerunning_a_finished_experiment_leaves_best_untouched(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "finished")
    _train_in_process("finished")
    best = in_tmp_repo / "exp_out/finished/best.pt"
    before, mtime = best.read_bytes(), best.stat().st_mtime_ns
    assert run_dir.read_status(str(best.parent))["status"] == "complete"

    with pytest.raises(run_dir.ExperimentDirError, match=r"finished training run.*Trainer.overwrite=True"):
        _train_in_process("finished")
    assert best.read_bytes() == before and best.stat().st_mtime_ns == mtime
    assert len(read_results(str(best.parent / "results.txt"))) == 2  # no step-0 evaluation was appended

    _train_in_process("finished", "P/TRAIN/Trainer.overwrite=True")  # the explicit flag trains it again
    assert run_dir.read_status(str(best.parent))["status"] == "complete"
    assert len(read_results(str(best.parent / "results.txt"))) == 4


def test_finished_run_from_before_the_marker_is_recognised_by_its_finish_pt(in_tmp_repo, monkeypatch):
    directory = in_tmp_repo / "exp_out/legacy"
    directory.mkdir(parents=True)
    (directory / "finish.pt").write_bytes(b"x")
    assert "finish.pt exists" in run_dir.finished_reason(str(directory))
    (directory / "resume.pt").write_bytes(b"x")  # killed between finish.pt and the marker: resumable instead
    assert run_dir.finished_reason(str(directory)) is None


def test_no_validation_interval_keeps_the_trained_weights(in_tmp_repo, monkeypatch):
    """validation_step_interval=None validates the final weights, so best.pt is not the untrained model unless it
    scored strictly better. Generation exact match is 0 before and after 3 steps: the tie goes to the trained
    weights."""
    monkeypatch.setenv("EXP_NAME", "no_interval")
    gin.clear_config()
    registry.reset()
    parse_gin(GINS, ['P/TRAIN/Trainer.datasets="D/TOYREVERSE/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYREVERSE/EVAL"',
                     "D/ToyDataset.batch_size=4", "D/TOYREVERSE/TRAIN/ToyDataset.num_examples=12",
                     "D/TOYREVERSE/EVAL/ToyDataset.num_examples=4", "D/TOYREVERSE/EVAL/InterfaceInfo.max_gen_length=4",
                     "P/TRAIN/Trainer.gradient_accumulation_factor=1", "P/TRAIN/Trainer.num_steps=3",
                     "P/TRAIN/Trainer.validation_step_interval=None", "main.logging_backend=None"])
    main()
    out = in_tmp_repo / "exp_out/no_interval"
    assert [e[1]["step"] for e in read_results(str(out / "results_in_training.txt"))] == [3]
    evaluator = registry.get_object("P/EVALUATE")
    assert evaluator.best_step in (0, 3)
    if evaluator.best_step == 3:
        assert same_tensors(out / "best.pt", out / "finish.pt")
    b = read_checkpoint(str(out / "finish.pt"))["decoder.block.0.layer.0.SelfAttention.q.expert_lora_b"]
    assert b.abs().sum() > 0  # trained


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    path = str(tmp_path / "resume.pt")
    resume.write_resume(path, {"rng": resume.capture_rng_state()})
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    resume.restore_rng_state(resume.read_resume(path)["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_damaged_resume_checkpoint_is_reported_without_pickle_advice(tmp_path):
    path = tmp_path / "resume.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(RuntimeError, match="damaged. Delete it") as error:
        resume.read_resume(str(path))
    assert "weights_only=False" not in str(error.value)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    directory = tmp_path / "exp"
    directory.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(directory / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid %d' % os.getpid()); print('locked', flush=True)\n"
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.ExperimentDirError, match=rf"in use by another run \(pid {holder.pid}\)"):
            run_dir.claim(str(directory), "P/TRAIN")
    finally:
        holder.kill()
        holder.wait()
    assert run_dir.claim(str(directory), "P/TRAIN") == []  # free again once the holder is gone
    run_dir.release_lock(str(directory))


def test_unwritable_experiment_directory_is_refused_before_any_work(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "blocked")
    (in_tmp_repo / "exp_out").mkdir()
    (in_tmp_repo / "exp_out/blocked").write_text("a file where the run's directory should be")
    gin.clear_config()
    registry.reset()
    parse_gin(GINS, SMALL + ['main.exp_name="blocked"', "P/TRAIN/Trainer.num_steps=2"])
    with pytest.raises(run_dir.ExperimentDirError, match=r"cannot write to exp_out/blocked .*nothing was run"):
        main()
    assert not (in_tmp_repo / "exp_out/blocked/best.pt").exists()


def test_warm_start_into_the_directory_it_starts_from_is_refused(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "source")
    _train_in_process("source")
    monkeypatch.setenv("EXP_NAME", "source")
    gin.clear_config()
    registry.reset()
    parse_gin(GINS, SMALL + ['main.exp_name="source"', "P/TRAIN/Trainer.overwrite=True",
                             'M/MODEL/Model.init_moma_calls=[@M/MODEL/modify_with_lora, @M/MODEL/load_weights]',
                             'M/MODEL/load_weights.weight_path="exp_out/source/best.pt"'])
    before = (in_tmp_repo / "exp_out/source/best.pt").read_bytes()
    with pytest.raises(run_dir.ExperimentDirError, match="its own -exp_name"):
        main()
    assert (in_tmp_repo / "exp_out/source/best.pt").read_bytes() == before


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_sigterm_to_the_launcher_stops_the_python_run(in_tmp_repo):
    command = ["bash", "colm/experiments/bash_scripts/train_single_task_loralinear.sh", "-exp_name", "term",
               "-dataset", "TOYSENTIMENT", "-extra_bindings",
               "main.logging_backend=None P/TRAIN/Trainer.num_steps=100000 P/TRAIN/Trainer.gradient_accumulation_factor=1 "
               "D/ToyDataset.batch_size=4 D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=8"]
    launcher = subprocess.Popen(command, cwd=in_tmp_repo, env=subprocess_env(in_tmp_repo),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status_file = in_tmp_repo / "exp_out/term" / run_dir.STATUS_FILE
    deadline = time.time() + 120
    while not status_file.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert status_file.exists(), "the run did not start"
    pid = json.loads(status_file.read_text())["pid"]
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # python ended with its launcher instead of writing on as an orphan
