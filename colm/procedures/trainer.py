"""Trainer: optimiser steps with gradient accumulation, clipping, validation and checkpoint calls (spec 5.1).

All the state a resumed run needs lives in `self.state` (step and data position) next to the model,
optimiser and scheduler, so it can be saved and restored in one place.
"""

import math

import gin
import torch
from tqdm.auto import tqdm

from colm.procedures.optim import get_optimizer, get_scheduler
from colm.procedures.procedure import Procedure
from colm.utils.logging import log_metrics


@gin.configurable
class Trainer(Procedure):
    linking_fields = ("model", "datasets", "validate_procedure")

    def __init__(self, name, model=gin.REQUIRED, datasets=gin.REQUIRED, batcher=gin.REQUIRED, num_steps=10000,
                 gradient_accumulation_factor=1, gradient_clipping=1.0, validate_procedure=None,
                 report_step_interval=50, validation_step_interval=None, save_model_step_interval=None,
                 step_moma_calls=(), report_moma_calls=(), save_model_moma_calls=(), finish_moma_calls=(),
                 pass_current_step=False, seed=42):
        super().__init__(name, seed)
        self.model = model
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self.batcher = batcher
        self.num_steps = num_steps
        self.gradient_accumulation_factor = gradient_accumulation_factor
        self.gradient_clipping = gradient_clipping
        self.validate_procedure = validate_procedure
        self.report_step_interval = report_step_interval
        self.validation_step_interval = validation_step_interval
        self.save_model_step_interval = save_model_step_interval
        self.step_moma_calls = list(step_moma_calls)
        self.report_moma_calls = list(report_moma_calls)
        self.save_model_moma_calls = list(save_model_moma_calls)
        self.finish_moma_calls = list(finish_moma_calls)
        self.pass_current_step = pass_current_step
        if gradient_accumulation_factor < 1:
            raise ValueError(f"{name}/Trainer.gradient_accumulation_factor must be >= 1, got {gradient_accumulation_factor}.")
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}

    def late_init(self):
        for dataset in self.datasets:
            dataset.set_tokenizer(self.model.tokenizer)
        self.batcher.set_tokenizer(self.model.tokenizer)
        self.batcher.set_seed(self.seed)
        self.optimizer = get_optimizer(self.model.named_trainable_parameters())
        self.scheduler = get_scheduler(self.optimizer, self.num_steps)

    def describe(self) -> str:
        names = [d.name for d in self.datasets]
        return (f"Trainer on {names}: {self.num_steps} steps x {self.gradient_accumulation_factor} micro-batches, "
                f"{sum(p.numel() for _, p in self.model.named_trainable_parameters()):,} trainable parameters")

    def _batches(self):
        for epoch, index, batch in self.batcher.endless(
            self.datasets, start_epoch=self.state["epoch"], start_batch=self.state["batch_in_epoch"]
        ):
            self.state["epoch"], self.state["batch_in_epoch"] = epoch, index + 1
            yield batch

    def _interface_info(self, batch):
        names = batch.get("dataset_name")
        if names:
            for dataset in self.datasets:
                if dataset.name == names[0]:
                    return dataset.interface_info
        return self.datasets[0].interface_info

    def train_step(self, batches) -> dict:
        model = self.model
        params = [p for _, p in model.named_trainable_parameters()]
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        passing = {"current_step": self.state["step"]} if self.pass_current_step else None
        for _ in range(self.gradient_accumulation_factor):
            batch = next(batches)
            loss = model(batch, self._interface_info(batch), passing)["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{self.name}: the loss is {loss.item()} at step {self.state['step']} "
                    f"(datasets {batch.get('dataset_name', ['?'])[:1]}). Lower the learning rate "
                    "(P/TRAIN/get_optimizer.learning_rate) or check the data; saved checkpoints are untouched."
                )
            (loss / self.gradient_accumulation_factor).backward()
            total += loss.item() / self.gradient_accumulation_factor
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.gradient_clipping if self.gradient_clipping else math.inf)
        for call in self.step_moma_calls:
            call(model)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.state["step"] += 1
        model.global_step = self.state["step"]
        return {"loss": total, "grad_norm": float(grad_norm), "lr": lr}

    def run(self):
        model = self.model
        model.train()
        batches = self._batches()
        tracked = []
        bar = tqdm(total=self.num_steps, initial=self.state["step"], desc=self.name, dynamic_ncols=True)
        while self.state["step"] < self.num_steps:
            stats = self.train_step(batches)
            tracked.append(stats)
            step = self.state["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
            if self.report_step_interval and step % self.report_step_interval == 0:
                for call in self.report_moma_calls:
                    call(model)
                summary = {k: sum(s[k] for s in tracked) / len(tracked) for k in tracked[0]}
                log_metrics({self.name: summary}, step)
                tracked = []
            if self.validation_step_interval and step % self.validation_step_interval == 0 and self.validate_procedure:
                bar.clear()
                self.validate_procedure.run_in_scope(step=step)
                model.train()
            if self.save_model_step_interval and step % self.save_model_step_interval == 0:
                for call in self.save_model_moma_calls:
                    call(model)
        bar.close()
        interval = self.validation_step_interval
        if interval and self.validate_procedure and self.state["step"] % interval:
            # Validate the final weights too, so best.pt always reflects the end of training (the original
            # wrote no best.pt at all when num_steps was not a multiple of the interval).
            self.validate_procedure.run_in_scope(step=self.state["step"])
        model.eval()
        for call in self.finish_moma_calls:
            call(model)
