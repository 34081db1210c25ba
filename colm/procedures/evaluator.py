"""Evaluator: scores every dataset, aggregates, saves results, tracks the best model (spec 5.3).

When a Trainer validates with it (`Trainer.validate_procedure`), the Evaluator knows that Trainer: an evaluation
run before training (train.gin's first P/EVALUATE) is recorded as "Before training (step 0)" in results.txt, not
as final results, and is skipped when the Trainer resumes an interrupted run (the resumed model is not the
untrained one, and the best score of the interrupted run is restored instead).

Under torchrun (docs/distributed.md) each rank runs every world-th batch of a dataset (the batcher's `stride`: the
same batches, padding included, as one process runs), the predictions are gathered to rank 0 in batch order and
scored there, so results.txt is the single process's; every rank gets the scores back (the best model is decided
alike everywhere) and only rank 0 writes and logs. Analysis processors need every batch in one process: with
them rank 0 evaluates alone and the other ranks wait for its scores.
"""

import gin
import torch

from colm.datasets.metrics import Scorer
from colm.procedures.batchers import SingleTaskBatcher
from colm.procedures.procedure import Procedure
from colm.procedures.results import aggregate
from colm.utils import distributed
from colm.utils.logging import log_metrics
from colm.utils.progress import progress


@gin.configurable
class Evaluator(Procedure):
    linking_fields = ("model", "datasets")

    def __init__(self, name, model=gin.REQUIRED, datasets=gin.REQUIRED, save_results=None, batcher=None,
                 analysis_processors=(), higher_is_better=True, better_model_moma_calls=(), seed=42):
        super().__init__(name, seed)
        self.model = model
        self.datasets = [datasets] if isinstance(datasets, str) else list(datasets)
        self.save_results = save_results
        self.batcher = batcher or SingleTaskBatcher(shuffle=False, drop_last=False)
        self.analysis_processors = list(analysis_processors)
        self.higher_is_better = higher_is_better
        self.better_model_moma_calls = list(better_model_moma_calls)
        self.best_score = None
        self.best_step = None  # the step whose model is in best.pt (0: before training), when known
        self.last_results = None
        self.trainer = None

    def attach_trainer(self, trainer):
        """Called by a Trainer that validates with this Evaluator (Trainer.link)."""
        self.trainer = trainer

    def late_init(self):
        seen, unique = set(), []
        for dataset in self.datasets:
            if dataset.name not in seen:
                seen.add(dataset.name)
                unique.append(dataset)
        self.datasets = unique
        for dataset in self.datasets:
            dataset.set_tokenizer(self.model.tokenizer)
        self.batcher.set_tokenizer(self.model.tokenizer)
        self.batcher.set_seed(self.seed)

    def describe(self) -> str:
        return f"Evaluator on {len(self.datasets)} dataset(s): {[d.name for d in self.datasets][:8]}"

    def _sharded(self) -> bool:
        return distributed.is_distributed() and not self.analysis_processors

    @torch.no_grad()
    def evaluate_dataset(self, dataset) -> dict:
        """The dataset's scores on every rank (computed on rank 0 under torchrun)."""
        info = dataset.interface_info
        if info.interface not in ("mc", "gen"):
            raise ValueError(f"{dataset.name}: the Evaluator scores 'mc' or 'gen' interfaces, not {info.interface!r}.")
        if distributed.is_distributed() and not self._sharded():
            values = self._score_dataset(dataset) if distributed.is_main() else None
            return distributed.broadcast_from_main(values)
        if not distributed.is_distributed():
            return self._score_dataset(dataset)
        rank, world = distributed.rank(), distributed.world_size()
        mine = self._predict(dataset, stride=(rank, world))
        values = None
        shards = distributed.gather_to_main(mine)
        if distributed.is_main():
            scorer = Scorer(dataset.metrics)
            # Rank r ran batches r, r + world, ...: interleave the shards back into batch order.
            for j in range(max(len(shard) for shard in shards)):
                for shard in shards:
                    if j < len(shard):
                        scorer.add(**shard[j])
            values = self._values(scorer)
        return distributed.broadcast_from_main(values)

    def _predict(self, dataset, stride):
        """[Scorer.add arguments] of each batch this process runs, in batch order."""
        info = dataset.interface_info
        total = -(-len(dataset) // dataset.batch_size)
        if stride is not None:
            total = len(range(stride[0], total, stride[1]))
        added = []
        for batch in progress(self.batcher.iterate([dataset], epoch=0, stride=stride), desc=f"{self.name} {dataset.name}",
                              total=total, leave=False, dynamic_ncols=True,
                              **({} if distributed.is_main() else {"disable": True})):
            outputs = self.model(batch, info)
            if info.interface == "mc":
                added.append(dict(predictions=outputs["prediction"].tolist(), labels=batch["label"].tolist(),
                                  multi_labels=batch.get("multi_label")))
            else:
                added.append(dict(output_texts=outputs["output_text"], references=batch["references"]))
            for processor in self.analysis_processors:
                processor.batch_process(batch, outputs, self.model.global_hidden_dict, self.model)
        return added

    def _score_dataset(self, dataset):
        """Every batch in this process (no torchrun, or analysis processors under it)."""
        scorer = Scorer(dataset.metrics)
        for added in self._predict(dataset, stride=None):
            scorer.add(**added)
        values = self._values(scorer)
        for processor in self.analysis_processors:
            processor.dataset_process(dataset.name)
        return values

    @staticmethod
    def _values(scorer) -> dict:
        values = {k: round(v, 3) for k, v in scorer.compute().items()}
        values["score"] = round(sum(values.values()) / len(values), 4)
        return values

    @staticmethod
    def _say(message):
        if distributed.is_main():
            print(message, flush=True)

    def run(self, step=None):
        label = None
        trainer = self.trainer
        if step is None and trainer is not None and not trainer.done:
            if trainer.resuming:
                self._say(f"[colm] {self.name}: step-0 evaluation skipped: {trainer.name} resumes an interrupted run "
                      f"({trainer.resume_from}), whose best score is restored.")
                return self.last_results
            label = "Before training (step 0)"
        self.model.eval()
        per_dataset = {}
        for dataset in self.datasets:
            if not dataset.metrics:
                continue
            per_dataset[dataset.name] = self.evaluate_dataset(dataset)
            self._say(f"[colm] {self.name} {dataset.name}: {per_dataset[dataset.name]}")
        results = aggregate(per_dataset)
        if step is not None:
            results["step"] = step
        elif label is not None:
            results["step"] = 0
        self._say(f"[colm] {self.name} average_score: {results['average_score']}")
        if distributed.is_main():
            log_metrics({self.name: results}, step if step is not None else self.model.global_step)
            if self.save_results is not None:
                if label is not None:
                    self.save_results(results, step=step, label=label)
                else:
                    self.save_results(results, step=step)
            for processor in self.analysis_processors:  # under torchrun only rank 0 ran them (docstring)
                processor.cross_dataset_process()
                processor.save(step)
        score = results["average_score"]
        better = self.best_score is None or (score >= self.best_score if self.higher_is_better else score <= self.best_score)
        if better and score is not None:
            self.best_score = score
            # A final evaluation (no step) re-scores the weights already in best.pt: their step stays.
            self.best_step = step if step is not None else (0 if label is not None else self.best_step)
            distributed.run_moma_calls(self.better_model_moma_calls, self.model)
        self.last_results = results
        return results

