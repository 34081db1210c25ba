"""Stage 1 end to end, through the README's launcher: a LoRA expert on a toy task beats the untrained model."""

import pytest
import torch

from colm.formats.checkpoint_io import read_checkpoint
from colm.procedures.results import read_results


@pytest.mark.slow
def test_trained_expert_beats_untrained_model(in_tmp_repo, launch):
    launch(
        "train_single_task_loralinear.sh", "-exp_name", "toy_lora", "-dataset", "TOYTOPIC",
        "-extra_bindings",
        "MOMA/save_weights.should_save_to_gcp=False P/TRAIN/Trainer.gradient_accumulation_factor=1 "
        "P/TRAIN/Trainer.num_steps=200 P/TRAIN/Trainer.validation_step_interval=100 main.logging_backend=None "
        "D/TOYTOPIC/EVAL/ToyDataset.num_examples=100",
    )
    out = in_tmp_repo / "exp_out/toy_lora"
    for name in ("best.pt", "finish.pt", "results.txt", "results_in_training.txt"):
        assert (out / name).is_file(), name
    best = read_checkpoint(str(out / "best.pt"))
    a = best["encoder.block.0.layer.0.SelfAttention.q.expert_lora_a"]
    b = best["decoder.block.1.layer.1.EncDecAttention.v.expert_lora_b"]
    assert a.shape == (16, 128) and b.shape == (128, 16)
    assert all(k.endswith((".expert_lora_a", ".expert_lora_b")) for k in best) and len(best) == 2 * 72
    assert b.abs().sum() > 0  # trained: B moved away from its zero init

    entries = read_results(str(out / "results.txt"))
    untrained = entries[0][1]["average_score"]  # step-0 validation of the untouched model
    trained = entries[-1][1]["average_score"]   # best.pt reloaded after training
    assert trained >= untrained + 0.25, (untrained, trained)

    # The evaluation launcher reads best.pt and reproduces the trained score.
    launch("eval_single_task_loralinear.sh", "-exp_name", "toy_lora",
                 "-dataset", "TOYTOPIC", "-extra_bindings",
                 "main.logging_backend=None D/TOYTOPIC/EVAL/ToyDataset.num_examples=100")
    assert read_results(str(out / "results.txt"))[-1][1]["average_score"] == trained
    assert torch.equal(read_checkpoint(str(out / "best.pt"))["decoder.block.1.layer.1.EncDecAttention.v.expert_lora_b"], b)


@pytest.mark.slow
def test_launcher_rejects_unknown_flag_and_missing_dataset(in_tmp_repo, launch):
    done = launch("train_single_task_loralinear.sh", "-exp_name", "x", "-datset", "Y", expect_ok=False)
    assert done.returncode == 2 and "unknown flag '-datset'" in done.stderr
    # a repeated flag would drop the first copy's bindings (e.g. num_steps): refused before anything runs
    done = launch("train_single_task_loralinear.sh", "-exp_name", "x", "-dataset", "TOYSENTIMENT", "-extra_bindings",
                  "P/TRAIN/Trainer.num_steps=2", "-extra_bindings", "P/TRAIN/Trainer.overwrite=True", expect_ok=False)
    assert done.returncode == 2 and "flag '-extra_bindings' is given twice" in done.stderr
    done = launch("train_single_task_loralinear.sh", "-exp_name", "x", "-dataset", "TOYNOPE", expect_ok=False)
    assert done.returncode != 0 and "D/TOYNOPE/TRAIN" in done.stderr
    assert not (in_tmp_repo / "exp_out/x/best.pt").exists()
