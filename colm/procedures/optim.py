"""Optimisers and learning-rate schedules (spec 5.2), configured under the trainer's scope (P/TRAIN)."""

import math

import gin
import torch

SCHEDULES = ("constant_with_warmup", "defrost", "linear_decay_with_warmup", "polynomial_decay_with_warmup",
             "exponential_decay", "cosine_annealing", "adafactor")


@gin.configurable
def get_optimizer(named_parameters, optimizer_class="adamw", learning_rate=gin.REQUIRED, weight_decay=0.0,
                  scale_parameter=False, relative_step=False):
    params = [p for _, p in named_parameters]
    if not params:
        raise ValueError("No trainable parameters: check Model.trainable_params (e.g. \".*expert.*\").")
    if optimizer_class == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay, eps=1e-8)
    if optimizer_class == "adam":
        return torch.optim.Adam(params, lr=learning_rate)
    if optimizer_class == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    if optimizer_class == "adafactor":
        from transformers.optimization import Adafactor  # imported here: it pulls in much of transformers

        return Adafactor(params, lr=None if relative_step else learning_rate, weight_decay=weight_decay,
                         scale_parameter=scale_parameter, relative_step=relative_step, warmup_init=False)
    raise ValueError(f"get_optimizer.optimizer_class={optimizer_class!r}; choose adamw, adam, sgd or adafactor.")


def schedule_factor(name, step, num_steps, warmup, gamma=None):
    """LR multiplier before optimiser update number `step` (0-based).

    Warm-up uses (step + 1) / warmup, so the first update is not wasted with lr 0 (a defect of the original).
    """
    if name == "constant_with_warmup":
        return (step + 1) / warmup if step < warmup else 1.0
    if name == "defrost":
        if step < warmup:
            return 0.0
        return (step - warmup + 1) / warmup if step < 2 * warmup else 1.0
    if name in ("linear_decay_with_warmup", "polynomial_decay_with_warmup"):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (num_steps - step) / max(1, num_steps - warmup))
    if name == "exponential_decay":
        if gamma is None:
            raise ValueError("get_scheduler.gamma must be set for exponential_decay.")
        return gamma**step
    if name == "cosine_annealing":
        return 0.5 * (1 + math.cos(math.pi * step / num_steps))
    raise ValueError(f"get_scheduler.scheduler_class={name!r}; choose one of {SCHEDULES}.")


@gin.configurable
def get_scheduler(optimizer, num_steps, scheduler_class="constant_with_warmup", gamma=None, warmup_ratio=None,
                  num_warmup_steps=None):
    if scheduler_class == "adafactor":
        from transformers.optimization import AdafactorSchedule

        return AdafactorSchedule(optimizer)
    warmup = num_warmup_steps if num_warmup_steps is not None else int(num_steps * (warmup_ratio or 0))
    schedule_factor(scheduler_class, 0, num_steps, warmup, gamma)  # fail now, not mid-run, on a bad name
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: schedule_factor(scheduler_class, step, num_steps, warmup, gamma)
    )
