"""Evaluator: scores every dataset, aggregates, saves results, tracks the best model (spec 5.3).

When a Trainer validates with it (`Trainer.validate_procedure`), the Evaluator knows that Trainer: an evaluation
run before training (train.gin's first P/EVALUATE) is recorded as "Before training (step 0)" in results.txt, not
as final results, and is skipped when the Trainer resumes an interrupted run (the resumed model is not the
untrained one, and the best score of the interrupted run is restored instead).
"""

import gin
import torch

from colm.datasets.metrics import Scorer
from colm.procedures.batchers import SingleTaskBatcher
from colm.procedures.procedure import Procedure
from colm.procedures.results import aggregate
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

    @torch.no_grad()
    def evaluate_dataset(self, dataset) -> dict:
        scorer = Scorer(dataset.metrics)
        info = dataset.interface_info
        for batch in progress(self.batcher.iterate([dataset], epoch=0), desc=f"{self.name} {dataset.name}",
                          total=-(-len(dataset) // dataset.batch_size), leave=False, dynamic_ncols=True):
            outputs = self.model(batch, info)
            if info.interface == "mc":
                scorer.add(predictions=outputs["prediction"].tolist(), labels=batch["label"].tolist(),
                           multi_labels=batch.get("multi_label"))
            elif info.interface == "gen":
                scorer.add(output_texts=outputs["output_text"], references=batch["references"])
            else:
                raise ValueError(f"{dataset.name}: the Evaluator scores 'mc' or 'gen' interfaces, not {info.interface!r}.")
            for processor in self.analysis_processors:
                processor.batch_process(batch, outputs, self.model.global_hidden_dict, self.model)
        values = {k: round(v, 3) for k, v in scorer.compute().items()}
        values["score"] = round(sum(values.values()) / len(values), 4)
        for processor in self.analysis_processors:
            processor.dataset_process(dataset.name)
        return values

    def run(self, step=None):
        label = None
        trainer = self.trainer
        if step is None and trainer is not None and not trainer.done:
            if trainer.resuming:
                print(f"[colm] {self.name}: step-0 evaluation skipped: {trainer.name} resumes an interrupted run "
                      f"({trainer.resume_from}), whose best score is restored.")
                return self.last_results
            label = "Before training (step 0)"
        self.model.eval()
        per_dataset = {}
        for dataset in self.datasets:
            if not dataset.metrics:
                continue
            per_dataset[dataset.name] = self.evaluate_dataset(dataset)
            print(f"[colm] {self.name} {dataset.name}: {per_dataset[dataset.name]}")
        results = aggregate(per_dataset)
        if step is not None:
            results["step"] = step
        elif label is not None:
            results["step"] = 0
        print(f"[colm] {self.name} average_score: {results['average_score']}")
        log_metrics({self.name: results}, step if step is not None else self.model.global_step)
        if self.save_results is not None:
            if label is not None:
                self.save_results(results, step=step, label=label)
            else:
                self.save_results(results, step=step)
        for processor in self.analysis_processors:
            processor.cross_dataset_process()
            processor.save(step)
        score = results["average_score"]
        better = self.best_score is None or (score >= self.best_score if self.higher_is_better else score <= self.best_score)
        if better and score is not None:
            self.best_score = score
            # A final evaluation (no step) re-scores the weights already in best.pt: their step stays.
            self.best_step = step if step is not None else (0 if label is not None else self.best_step)
            for call in self.better_model_moma_calls:
                call(self.model)
        self.last_results = results
        return results

