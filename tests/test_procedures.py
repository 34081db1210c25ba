"""Trainer and Evaluator behaviour that a researcher relies on."""

import math
import os

import pytest
import torch

from colm import registry
from colm.ginparse import parse_gin
from colm.main import main
from colm.procedures.optim import schedule_factor

TRAIN_GINS = ["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
              "colm/experiments/train_single_task_loralinear.gin"]
TOY = ['P/TRAIN/Trainer.datasets="D/TOYSENTIMENT/TRAIN"', 'P/EVALUATE/Evaluator.datasets="D/TOYSENTIMENT/EVAL"',
       "D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=32", "P/TRAIN/Trainer.gradient_accumulation_factor=1"]


def test_schedules():
    assert [schedule_factor("constant_with_warmup", t, 100, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert schedule_factor("constant_with_warmup", 0, 100, 0) == 1.0
    assert [schedule_factor("defrost", t, 100, 2) for t in range(5)] == [0, 0, 0.5, 1, 1]
    assert schedule_factor("linear_decay_with_warmup", 55, 100, 10) == pytest.approx(45 / 90)
    assert schedule_factor("cosine_annealing", 50, 100, 0) == pytest.approx(0.5)
    assert schedule_factor("exponential_decay", 3, 100, 0, gamma=0.5) == 0.125
    with pytest.raises(ValueError, match="linear_decay"):
        schedule_factor("linear_decay", 0, 10, 0)


def test_gradient_accumulation_matches_one_big_batch(make_model):
    """Two micro-batches of 4 accumulate to the gradient of one batch of 8 (lm loss is a per-batch mean
    over tokens, so equal target lengths make the two identical)."""
    from colm.datasets.dataset import InterfaceInfo
    from colm.moma.lora import modify_with_lora

    def lora(m):
        modify_with_lora(m, lora_modules=".*DenseReluDense", lora_layers="wo")

    torch.manual_seed(0)
    ids = torch.randint(3, 200, (8, 6))
    targets = torch.randint(3, 200, (8, 3))
    info = InterfaceInfo(interface="lm")
    grads = []
    for chunks in (1, 2):
        model = make_model([lora], trainable_params="expert")
        for _, p in model.named_trainable_parameters():
            torch.nn.init.constant_(p, 0.1)
        for part_ids, part_targets in zip(ids.chunk(chunks), targets.chunk(chunks)):
            loss = model({"input_ids": part_ids, "target_ids": part_targets}, info)["loss"]
            (loss / chunks).backward()
        grads.append(torch.cat([p.grad.flatten() for _, p in model.named_trainable_parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_nan_loss_stops_with_a_clear_error_and_keeps_best(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "nan_run")
    parse_gin(TRAIN_GINS, TOY + ["P/TRAIN/Trainer.num_steps=5", "P/TRAIN/get_optimizer.learning_rate=1e30",
                                 "P/TRAIN/get_optimizer.optimizer_class='sgd'", "P/TRAIN/Trainer.gradient_clipping=0"])
    with pytest.raises(FloatingPointError, match="learning_rate"):
        main()
    assert os.path.isfile(in_tmp_repo / "exp_out/nan_run/best.pt")  # the step-0 best survives


def test_best_is_saved_when_score_is_at_least_the_best(in_tmp_repo, monkeypatch):
    monkeypatch.setenv("EXP_NAME", "best_run")
    parse_gin(TRAIN_GINS, TOY + ["P/TRAIN/Trainer.num_steps=4", "P/TRAIN/Trainer.validation_step_interval=2"])
    main()
    evaluator = registry.get_object("P/EVALUATE")
    trainer = registry.get_object("P/TRAIN")
    assert trainer.state["step"] == 4 and evaluator.best_score is not None
    for name in ("best.pt", "finish.pt", "results.txt", "results_in_training.txt"):
        assert (in_tmp_repo / "exp_out/best_run" / name).is_file()
    text = (in_tmp_repo / "exp_out/best_run/results_in_training.txt").read_text()
    assert "Training step: 2" in text and "Training step: 4" in text
    assert not math.isnan(evaluator.last_results["average_score"])
