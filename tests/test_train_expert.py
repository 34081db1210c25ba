"""Stage 1 end to end, through the README's launcher: a LoRA expert on a toy task beats the untrained model."""

import os
import subprocess
import sys

import torch

from colm.moma.weights import read_checkpoint
from colm.procedures.results import read_results

SCRIPTS = "colm/experiments/bash_scripts"


def run_launcher(cwd, script, *flags):
    env = {k: v for k, v in os.environ.items() if k not in ("COLM_ROOT", "EXP_NAME", "DATASET")}
    env.update(MODEL_TYPE="tiny", PYTHON_EXEC=sys.executable, COLM_NO_VENV="1")
    done = subprocess.run(["bash", f"{SCRIPTS}/{script}", *flags], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_trained_expert_beats_untrained_model(in_tmp_repo):
    run_launcher(
        in_tmp_repo, "train_single_task_loralinear.sh", "-exp_name", "toy_lora", "-dataset", "TOYFIRSTLETTERCLASS",
        "-extra_bindings",
        "MOMA/save_weights.should_save_to_gcp=False P/TRAIN/Trainer.gradient_accumulation_factor=1 "
        "P/TRAIN/Trainer.num_steps=80 P/TRAIN/Trainer.validation_step_interval=40 main.logging_backend=None",
    )
    out = in_tmp_repo / "exp_out/toy_lora"
    for name in ("best.pt", "finish.pt", "results.txt", "results_in_training.txt"):
        assert (out / name).is_file(), name
    best = read_checkpoint(str(out / "best.pt"))
    a = best["encoder.block.0.layer.0.SelfAttention.q.expert_lora_a"]
    b = best["decoder.block.1.layer.1.EncDecAttention.v.expert_lora_b"]
    assert a.shape == (16, 64) and b.shape == (64, 16)
    assert all(k.endswith((".expert_lora_a", ".expert_lora_b")) for k in best) and len(best) == 2 * 36
    assert b.abs().sum() > 0  # trained: B moved away from its zero init

    entries = read_results(str(out / "results.txt"))
    untrained = entries[0][1]["average_score"]  # step-0 validation of the untouched model
    trained = entries[-1][1]["average_score"]   # best.pt reloaded after training
    assert trained >= untrained + 0.25, (untrained, trained)

    # The evaluation launcher reads best.pt and reproduces the trained score.
    run_launcher(in_tmp_repo, "eval_single_task_loralinear.sh", "-exp_name", "toy_lora",
                 "-dataset", "TOYFIRSTLETTERCLASS", "-extra_bindings", "main.logging_backend=None")
    assert read_results(str(out / "results.txt"))[-1][1]["average_score"] == trained
    assert torch.equal(read_checkpoint(str(out / "best.pt"))["decoder.block.1.layer.1.EncDecAttention.v.expert_lora_b"], b)


def test_launcher_rejects_unknown_flag_and_missing_dataset(in_tmp_repo):
    env = {k: v for k, v in os.environ.items() if k != "COLM_ROOT"}
    env.update(MODEL_TYPE="tiny", PYTHON_EXEC=sys.executable, COLM_NO_VENV="1")
    done = subprocess.run(["bash", f"{SCRIPTS}/train_single_task_loralinear.sh", "-exp_name", "x", "-datset", "Y"],
                          cwd=in_tmp_repo, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "unknown flag '-datset'" in done.stderr
    done = subprocess.run(["bash", f"{SCRIPTS}/train_single_task_loralinear.sh", "-exp_name", "x", "-dataset", "TOYNOPE"],
                          cwd=in_tmp_repo, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "D/TOYNOPE/TRAIN" in done.stderr
    assert not (in_tmp_repo / "exp_out/x/best.pt").exists()
