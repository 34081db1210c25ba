"""Trainer: optimiser steps with gradient accumulation, clipping, validation and checkpoint calls (spec 5.1).

Preemption-safe when `output_dir` is set (train.gin sets `exp_out/${EXP_NAME}`), see colm/utils/run_dir.py:
- before any work the directory is checked writable and locked (one run per exp_name), and the temporary
  files of a killed save are removed;
- every `checkpoint_step_interval` steps the whole training state is written to `<output_dir>/resume.pt`
  (colm/procedures/resume.py): trainable weights, optimiser, scheduler, gradient scaler, step, epoch and
  batch position, python/numpy/torch RNG states, the validating Evaluator's best score;
- re-running the same command on an unfinished run continues from resume.pt (bit for bit on CPU: the batch
  order is a function of (seed, epoch) only, colm/procedures/batchers.py, and the RNG states are restored),
  and the Evaluator that validates it skips its step-0 evaluation, so best.pt is never replaced by the
  untrained model;
- at the end `run_status.json` says "complete"; re-running a complete experiment is refused unless
  `Trainer.overwrite = True`.

Under torchrun (colm/utils/distributed.py, docs/distributed.md) every rank trains on its piece of each configured
batch (the batcher's `split`), gradients are averaged by DDP (or FSDP, `Trainer.data_parallel="fsdp"`, one unit per
transformer block: colm/procedures/fsdp.py) only after the last micro-batch of a step, and only rank 0 claims the
directory, saves and logs; every rank reads resume.pt. Under FSDP the resume file is gathered whole and written in
the single-process format, so one process, DDP and FSDP resume each other's files.
"""

import contextlib
import math
import numbers
import os

import gin
import torch
from torch.nn.parallel import DistributedDataParallel

from colm.formats.layout import BEST_CHECKPOINT
from colm.procedures import fsdp, resume
from colm.procedures.optim import get_optimizer, get_scheduler
from colm.procedures.procedure import Procedure
from colm.utils import distributed, run_dir
from colm.utils.coerce import as_bool
from colm.utils.logging import log_metrics
from colm.utils.paths import expand
from colm.utils.progress import progress


def _check_number(name, value, minimum=None, integer=False, allow_none=False):
    """Refuses a binding of the wrong type or range, naming it (gin passes strings through as they are)."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Integral if integer else numbers.Real)
    if wrong_type or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise TypeError(f"{name} must be {kind}{bound}{' or None' if allow_none else ''}, got {value!r} "
                        f"({type(value).__name__}). Fix the binding, e.g. {name.split('/')[-1]}=10.")


@gin.configurable
class Trainer(Procedure):
    linking_fields = ("model", "datasets", "validate_procedure")

    def __init__(self, name, model=gin.REQUIRED, datasets=gin.REQUIRED, batcher=gin.REQUIRED, num_steps=10000,
                 gradient_accumulation_factor=1, gradient_clipping=1.0, validate_procedure=None,
                 report_step_interval=50, validation_step_interval=None, save_model_step_interval=None,
                 step_moma_calls=(), report_moma_calls=(), save_model_moma_calls=(), finish_moma_calls=(),
                 pass_current_step=False, seed=42, output_dir=None, checkpoint_step_interval=100, overwrite=False,
                 divergence_factor=1e4, data_parallel="ddp", find_unused_parameters=True):
        super().__init__(name, seed)
        for param, value, minimum, allow_none in (
            ("num_steps", num_steps, 0, False), ("gradient_accumulation_factor", gradient_accumulation_factor, 1, False),
            ("report_step_interval", report_step_interval, 0, True),
            ("validation_step_interval", validation_step_interval, 0, True),
            ("save_model_step_interval", save_model_step_interval, 0, True),
            ("checkpoint_step_interval", checkpoint_step_interval, 0, True),
        ):
            _check_number(f"{name}/Trainer.{param}", value, minimum, integer=True, allow_none=allow_none)
        _check_number(f"{name}/Trainer.gradient_clipping", gradient_clipping, 0, allow_none=True)
        _check_number(f"{name}/Trainer.divergence_factor", divergence_factor, 1, allow_none=True)
        overwrite = as_bool(overwrite, f"{name}/Trainer.overwrite")
        if data_parallel not in ("ddp", "fsdp"):
            raise ValueError(f"{name}/Trainer.data_parallel={data_parallel!r}: choose \"ddp\" (a copy of the model "
                             "per process) or \"fsdp\" (the model sharded over the processes); it matters only "
                             "under torchrun.")
        self.data_parallel = data_parallel
        self.find_unused_parameters = as_bool(find_unused_parameters, f"{name}/Trainer.find_unused_parameters")
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
        self.output_dir = expand(output_dir, f"{name}/Trainer.output_dir") if output_dir else None
        self.checkpoint_step_interval = checkpoint_step_interval
        self.overwrite = overwrite
        self.divergence_factor = divergence_factor
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
        self.resume_from = None  # path of the resume checkpoint this run continues from
        self.done = False
        self.scaler = None
        self._tracked = []
        self._reference_rms = None
        self._parallel = None  # the DDP / FSDP wrapper of the model while training under torchrun
        self.fsdp_units = 0  # FSDP units of the wrapped model (every transformer block and the root)
        self._pending_optimizer_state = None  # under FSDP a resumed optimiser state loads once the model is sharded

    # ----- building -----------------------------------------------------------------------------
    def link(self):
        super().link()
        attach = getattr(self.validate_procedure, "attach_trainer", None)
        if attach is not None:
            attach(self)

    def late_init(self):
        for dataset in self.datasets:
            dataset.set_tokenizer(self.model.tokenizer)
        self.batcher.set_tokenizer(self.model.tokenizer)
        self.batcher.set_seed(self.seed)
        if distributed.is_distributed():
            self.batcher.check_split(self.datasets, distributed.world_size())
        self.optimizer = get_optimizer(self.model.named_trainable_parameters())
        self.scheduler = get_scheduler(self.optimizer, self.num_steps)
        if getattr(self.model, "compute_dtype", None) == torch.float16:
            # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
            self.scaler = torch.amp.GradScaler(self.model.device.type)
        if self.output_dir:
            self._claim_output_dir_on_main()

    def _claim_output_dir_on_main(self):
        """Rank 0 claims the directory (lock, status, overwrite) and tells the others whether to resume, or the
        refusal that stops every rank."""
        outcome = None
        if distributed.is_main():
            try:
                self._claim_output_dir()
            except run_dir.ExperimentDirError as error:
                outcome = str(error)
                if not distributed.is_distributed():
                    raise
        outcome, resume_from = distributed.broadcast_from_main((outcome, self.resume_from))
        if outcome is not None:
            raise run_dir.ExperimentDirError(outcome)
        self.resume_from = resume_from

    def _claim_output_dir(self):
        directory, what = self.output_dir, f"{self.name} (Trainer.output_dir={self.output_dir})"
        self._refuse_warm_start_into_own_source()
        removed = run_dir.claim(directory, what)
        if removed:
            print(f"[colm] {self.name}: removed {len(removed)} temporary file(s) a killed save left in {directory}: "
                  f"{[os.path.basename(p) for p in removed]}")
        resume_file = os.path.join(directory, run_dir.RESUME_FILE)
        finished = run_dir.finished_reason(directory)
        if self.overwrite:
            if finished or os.path.exists(resume_file):
                print(f"[colm] {self.name}: Trainer.overwrite=True: starting {directory} again from step 0; its "
                      "best.pt, finish.pt and results will be replaced.")
            if os.path.exists(resume_file):
                os.remove(resume_file)
        elif finished:
            run_dir.release_lock(directory)
            raise run_dir.ExperimentDirError(
                f"{self.name}: {directory} holds a finished training run ({finished}). Re-running it would replace "
                "its best.pt. Choose another -exp_name, or add the binding P/TRAIN/Trainer.overwrite=True (inside your "
                "one -extra_bindings '...') to train it again from step 0. Nothing was changed."
            )
        elif os.path.exists(resume_file):
            self.resume_from = resume_file
            print(f"[colm] {self.name}: resuming from {resume_file} (an unfinished run of this experiment).")
        elif os.path.exists(os.path.join(directory, BEST_CHECKPOINT)):
            print(f"[colm] {self.name}: {directory} holds a best.pt from an unfinished run that saved no resume "
                  "checkpoint; training starts from step 0 and will replace it.")
        run_dir.write_status(directory, status=run_dir.RUNNING, step=self.state["step"], num_steps=self.num_steps)

    def _refuse_warm_start_into_own_source(self):
        """A warm start must write into a directory of its own: training into the directory of the checkpoint
        it starts from would overwrite that run's best.pt and weights.<step>.pt."""
        own = os.path.realpath(self.output_dir)
        for source in getattr(self.model, "loaded_from", []):
            if os.path.dirname(os.path.realpath(source)) == own:
                raise run_dir.ExperimentDirError(
                    f"{self.name}: the model starts from {source}, inside {self.output_dir}, where this run writes its "
                    "own best.pt and weights.<step>.pt. Give the new run its own -exp_name (the source stays as it is).")

    @property
    def resuming(self) -> bool:
        return self.resume_from is not None and not self.done

    def describe(self) -> str:
        names = [d.name for d in self.datasets]
        return (f"Trainer on {names}: {self.num_steps} steps x {self.gradient_accumulation_factor} micro-batches, "
                f"{sum(p.numel() for _, p in self.model.named_trainable_parameters()):,} trainable parameters")

    # ----- the resume checkpoint ----------------------------------------------------------------
    def _sharded(self) -> bool:
        """Whether the model is FSDP-wrapped now (parameters and optimiser state sharded over the ranks)."""
        return self.data_parallel == "fsdp" and self._parallel is not None and self._parallel is not self.model

    def _whole_training_state(self):
        """(trainable weights by name, optimiser state dict) whole and in the single-process format, on rank 0 (the
        one that writes them). Under FSDP they are gathered from the shards, a collective every rank takes part in."""
        if self._sharded():
            return fsdp.trainable_state(self._parallel, self.model), fsdp.optimizer_state(self._parallel, self.optimizer)
        if not distributed.is_main():
            return None, None
        params = {n: p.detach().cpu().clone() for n, p in self.model.named_trainable_parameters()}
        return params, self.optimizer.state_dict()

    def _resume_payload(self, params, optimizer_state) -> dict:
        validator = self.validate_procedure
        return {
            "step": self.state["step"], "epoch": self.state["epoch"], "batch_in_epoch": self.state["batch_in_epoch"],
            "num_steps": self.num_steps, "datasets": [d.name for d in self.datasets],
            "global_step": int(getattr(self.model, "global_step", self.state["step"])),
            "params": params, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": resume.capture_rng_state(),
            "best_score": getattr(validator, "best_score", None), "best_step": getattr(validator, "best_step", None),
            "tracked": list(self._tracked), "reference_rms": self._reference_rms,
        }

    def save_resume_checkpoint(self):
        path = os.path.join(self.output_dir, run_dir.RESUME_FILE)
        # Each rank's RNG state: the ranks draw dropout masks for batch pieces of other shapes, so their
        # generators differ; each gets its own back on resume.
        rng_ranks = distributed.gather_to_main(resume.capture_rng_state())
        params, optimizer_state = self._whole_training_state()
        if distributed.is_main():
            payload = self._resume_payload(params, optimizer_state)
            if distributed.is_distributed():
                payload["rng_ranks"] = rng_ranks
            resume.write_resume(path, payload)
            run_dir.write_status(self.output_dir, status=run_dir.RUNNING, step=self.state["step"],
                                 num_steps=self.num_steps, best_score=getattr(self.validate_procedure, "best_score", None))
        distributed.barrier()  # no rank runs ahead (and can be killed) before resume.pt is whole
        return path

    def _restore(self, path):
        payload = resume.read_resume(path)
        fix = (f"Re-run with the bindings of the interrupted run, or bind {self.name}/Trainer.overwrite=True to start "
               "again from step 0.")
        datasets = [d.name for d in self.datasets]
        if payload["datasets"] != datasets or payload["num_steps"] != self.num_steps:
            raise ValueError(f"{path} was written by a run on {payload['datasets']} for {payload['num_steps']} steps; this "
                             f"run trains on {datasets} for {self.num_steps} steps. {fix}")
        params = dict(self.model.named_trainable_parameters())
        saved = payload["params"]
        if set(saved) != set(params):
            differing = sorted(set(saved) ^ set(params))
            raise ValueError(f"{path} holds other trainable parameters than this model (e.g. {differing[:3]}). {fix}")
        for name, param in params.items():
            value = saved[name]
            if value.shape != param.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model {tuple(param.shape)}. {fix}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{path}: {name} holds NaN or Inf values; the run had diverged before it was saved. "
                                 f"Bind {self.name}/Trainer.overwrite=True with a lower learning rate.")
            with torch.no_grad():
                param.copy_(value.to(param.device, param.dtype))
        # The model is not wrapped yet (run() restores first), so the weights above went into whole parameters on
        # every rank; FSDP's optimiser state is sharded, so under FSDP it loads once the model is (run()).
        if self.data_parallel == "fsdp" and distributed.is_distributed():
            self._pending_optimizer_state = payload["optimizer"]
        else:
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if self.scaler is not None and payload.get("scaler") is not None:
            self.scaler.load_state_dict(payload["scaler"])
        self.state = {"step": payload["step"], "epoch": payload["epoch"], "batch_in_epoch": payload["batch_in_epoch"]}
        self.model.global_step = payload["global_step"]
        validator = self.validate_procedure
        if validator is not None and hasattr(validator, "best_score"):
            validator.best_score = payload["best_score"]
            validator.best_step = payload.get("best_step")
        self._tracked = list(payload.get("tracked") or [])
        self._reference_rms = payload.get("reference_rms")
        rng_ranks = payload.get("rng_ranks") or [payload["rng"]]
        if len(rng_ranks) != distributed.world_size() and distributed.is_main():
            print(f"[colm] {self.name}: {path} was written by {len(rng_ranks)} process(es), this run has "
                  f"{distributed.world_size()}: the data position and weights carry over, dropout masks will differ.")
        resume.restore_rng_state(rng_ranks[distributed.rank()] if len(rng_ranks) == distributed.world_size()
                                 else payload["rng"])
        self._say(f"[colm] {self.name}: resumed at step {self.state['step']}/{self.num_steps} (epoch {self.state['epoch']}, "
                  f"batch {self.state['batch_in_epoch']}); best score so far {payload['best_score']}.")

    # ----- data parallelism -----------------------------------------------------------------------
    @staticmethod
    def _say(message):
        if distributed.is_main():
            print(message, flush=True)

    def _wrap_for_data_parallel(self):
        """The module each micro-batch runs through: the model itself in one process; under torchrun a DDP wrapper
        (a model copy per process, gradients averaged in backward) or an FSDP one (parameters, gradients and
        optimiser state sharded over the processes, every transformer block a unit of its own: colm/procedures/
        fsdp.py). Both wrap colm's Model as it is: its forward takes (batch, interface_info, passing), and DDP/FSDP
        pass those through untouched."""
        if not distributed.is_distributed():
            return self.model
        if self.data_parallel == "fsdp":
            dtypes = {p.dtype for p in self.model.parameters()}
            if len(dtypes) > 1:
                raise ValueError(f"{self.name}/Trainer.data_parallel=\"fsdp\" needs one dtype for all parameters; "
                                 f"this model has {sorted(map(str, dtypes))} (Model.mix_precision keeps frozen weights "
                                 "in low precision). Train with \"ddp\" or without mix_precision.")
            device = self.model.device
            if device.type == "cuda":
                device = torch.device("cuda", torch.cuda.current_device())
            parallel, message = fsdp.wrap(self.model, device, name=f"{self.name}/Trainer")
            self.fsdp_units = fsdp.count_units(parallel)
            self._say(message)
            return parallel
        # Top-k routing may leave some trainable experts out of a micro-batch's graph: find_unused_parameters
        # marks those ready so the gradient all-reduce does not wait for them forever. A plain LoRA expert uses
        # every trainable parameter, and Trainer.find_unused_parameters=False saves a graph traversal per step.
        return DistributedDataParallel(self.model, find_unused_parameters=self.find_unused_parameters)

    def _full_params(self):
        """Inside the block the plain model on every rank: every parameter whole and, under FSDP, the block
        wrappers out of the module tree, so validation and save calls see the single-process names (FSDP keeps
        only shards between steps)."""
        if self._sharded():
            return fsdp.full_model(self._parallel, self.model.torch_model)
        return contextlib.nullcontext()

    def _unwrap(self):
        """Ends data parallelism: under FSDP every parameter becomes a whole tensor of its own again and the block
        wrappers leave the module tree, so the procedures after training (final validation, finish calls) run the
        plain model."""
        sharded = self._sharded()
        parallel, self._parallel = self._parallel, None
        if sharded:
            fsdp.unwrap(parallel, self.model.torch_model)

    def _no_sync(self, last):
        """No gradient all-reduce for all but the last micro-batch of a step: gradients accumulate locally and
        are averaged once, the same sum a single process accumulates."""
        if last or self._parallel is None or self._parallel is self.model:
            return contextlib.nullcontext()
        return self._parallel.no_sync()

    def _loss_weight(self, batch) -> float:
        """Each rank's loss is a mean over its own piece of the batch (target tokens for lm, else examples), and
        DDP averages the ranks' gradients; weighting a rank by its share of the batch's tokens makes that average
        the mean over the whole batch, as one process computes it (1.0 in a single process)."""
        if not distributed.is_distributed():
            return 1.0
        targets = batch.get("target_ids")
        local = float((targets != self.model.pad_id).sum()) if isinstance(targets, torch.Tensor) else float(
            len(batch["input_ids"]))
        total = distributed.all_reduce_sum(local)
        return local * distributed.world_size() / total if total else 1.0

    # ----- training -----------------------------------------------------------------------------
    def _batches(self):
        split = (distributed.rank(), distributed.world_size()) if distributed.is_distributed() else None
        for epoch, index, batch in self.batcher.endless(
            self.datasets, start_epoch=self.state["epoch"], start_batch=self.state["batch_in_epoch"], split=split
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

    def _learning_rate_hint(self) -> str:
        lr = self.optimizer.param_groups[0].get("initial_lr", self.optimizer.param_groups[0]["lr"])
        return f"{self.name}/get_optimizer.learning_rate = {lr:g}"

    def _weights_rms(self, params) -> float:
        total = sum(float(p.detach().float().pow(2).sum()) for p in params)
        count = sum(p.numel() for p in params)
        if self._sharded():
            # Each rank holds a shard: sum over ranks, so every rank decides the same.
            total, count = distributed.all_reduce_sum(total), distributed.all_reduce_sum(count)
        return math.sqrt(total / max(count, 1))

    def _check_divergence(self, params):
        """Stops a run whose weights grow without bound even while the loss stays finite."""
        if not self.divergence_factor or not params:
            return
        rms = self._weights_rms(params)
        if self._reference_rms is None:
            self._reference_rms = max(rms, 1e-2)
            return
        limit = self.divergence_factor * self._reference_rms
        if not math.isfinite(rms) or rms > limit:
            raise FloatingPointError(
                f"{self.name}: training diverged at step {self.state['step']}: the trainable weights' RMS is {rms:.3g}, "
                f"more than {self.divergence_factor:g} x their starting {self._reference_rms:.3g} "
                f"({self.name}/Trainer.divergence_factor). Lower {self._learning_rate_hint()}; saved checkpoints are "
                "untouched."
            )

    def train_step(self, batches) -> dict:
        model = self.model
        params = [p for _, p in model.named_trainable_parameters()]
        if self._reference_rms is None:
            self._check_divergence(params)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        passing = {"current_step": self.state["step"]} if self.pass_current_step else None
        parallel = self._parallel or model
        for micro in range(self.gradient_accumulation_factor):
            batch = next(batches)
            weight = self._loss_weight(batch)
            with self._no_sync(last=micro == self.gradient_accumulation_factor - 1):
                loss = parallel(batch, self._interface_info(batch), passing)["loss"] * weight
                scaled = loss / self.gradient_accumulation_factor
                if torch.isfinite(loss):
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{self.name}: the loss is {loss.item()} at step {self.state['step']} "
                    f"(datasets {batch.get('dataset_name', ['?'])[:1]}). Lower the learning rate "
                    f"({self._learning_rate_hint()}) or check the data; saved checkpoints are untouched."
                )
            total += loss.item() / self.gradient_accumulation_factor
        if distributed.is_distributed():
            total = distributed.all_reduce_sum(total) / distributed.world_size()  # the whole batch's loss, for logs
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.gradient_clipping if self.gradient_clipping else math.inf
        if self._sharded():
            grad_norm = self._parallel.clip_grad_norm_(max_norm)  # the norm over every rank's gradient shard
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        for call in self.step_moma_calls:
            call(model)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when the unscaled gradients hold Inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.state["step"] += 1
        model.global_step = self.state["step"]
        self._check_divergence(params)
        return {"loss": total, "grad_norm": float(grad_norm), "lr": lr}

    def run(self):
        model = self.model
        if self.resume_from is not None:
            self._restore(self.resume_from)
        model.train()
        self._parallel = self._wrap_for_data_parallel()
        if self._pending_optimizer_state is not None:
            state, self._pending_optimizer_state = self._pending_optimizer_state, None
            if self._sharded():
                fsdp.load_optimizer_state(self._parallel, self.optimizer, state)
            else:
                self.optimizer.load_state_dict(state)
        batches = self._batches()
        # A bar on a terminal; in a log file a plain line per report interval instead of redraw frames.
        bar = progress(total=self.num_steps, initial=self.state["step"], desc=self.name, dynamic_ncols=True,
                       **({} if distributed.is_main() else {"disable": True}))
        while self.state["step"] < self.num_steps:
            stats = self.train_step(batches)
            self._tracked.append(stats)
            step = self.state["step"]
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.2e}")
            if self.report_step_interval and step % self.report_step_interval == 0:
                with self._full_params():
                    distributed.run_moma_calls(self.report_moma_calls, model)
                tracked = self._tracked
                summary = {k: sum(s[k] for s in tracked) / len(tracked) for k in tracked[0]}
                if distributed.is_main():
                    log_metrics({self.name: summary}, step)
                if bar.disable and distributed.is_main():
                    print(f"[colm] {self.name} step {step}/{self.num_steps}: loss {summary['loss']:.4f}, "
                          f"lr {summary['lr']:.2e}", flush=True)
                self._tracked = []
            if self.validation_step_interval and step % self.validation_step_interval == 0 and self.validate_procedure:
                bar.clear()
                with self._full_params():
                    self.validate_procedure.run_in_scope(step=step)
                model.train()
            if self.save_model_step_interval and step % self.save_model_step_interval == 0:
                with self._full_params():
                    distributed.run_moma_calls(self.save_model_moma_calls, model)
            if (self.output_dir and self.checkpoint_step_interval and step % self.checkpoint_step_interval == 0
                    and step < self.num_steps):
                self.save_resume_checkpoint()
        bar.close()
        self._unwrap()
        interval = self.validation_step_interval
        if self.validate_procedure and self.state["step"] > 0 and (not interval or self.state["step"] % interval):
            # Validate the final weights too, so best.pt always reflects the end of training (the original
            # wrote no best.pt at all when num_steps was not a multiple of the interval, and with no interval
            # reloaded the untrained step-0 best.pt at the end).
            self.validate_procedure.run_in_scope(step=self.state["step"])
        self._warn_if_best_is_untrained()
        model.eval()
        distributed.run_moma_calls(self.finish_moma_calls, model)
        self.done = True
        if self.output_dir and distributed.is_main():
            validator = self.validate_procedure
            run_dir.write_status(self.output_dir, status=run_dir.COMPLETE, step=self.state["step"],
                                 num_steps=self.num_steps, best_score=getattr(validator, "best_score", None),
                                 best_step=getattr(validator, "best_step", None))
            resume_file = os.path.join(self.output_dir, run_dir.RESUME_FILE)
            if os.path.exists(resume_file):
                os.remove(resume_file)
            run_dir.release_lock(self.output_dir)

    def _warn_if_best_is_untrained(self):
        validator = self.validate_procedure
        if (validator is None or self.num_steps == 0 or getattr(validator, "best_step", None) != 0
                or not distributed.is_main()):
            return
        print(f"[colm] WARNING: {self.name}: the untrained model (step 0, score {validator.best_score}) scored better "
              f"than every validated step of training, so best.pt holds the untrained weights; finish.pt holds the "
              f"trained ones. Check the learning rate ({self._learning_rate_hint()}) and the data.")
