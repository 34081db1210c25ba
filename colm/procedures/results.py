"""Writing evaluation results: `results.txt` (final, and the step-0 evaluation before training, labelled
"Before training (step 0)") or `results_in_training.txt` (during training); beside a final evaluation's
results.txt, `results.png`: a bar per dataset's score and the average (logged to wandb when wandb is on)."""

import ast
import os
import statistics

import gin

from colm.formats.layout import RESULTS_FILE, RESULTS_IN_TRAINING_FILE
from colm.procedures.plots import evaluation_bars
from colm.utils.logging import log_images
from colm.utils.paths import expand

RESULTS_FIGURE = "results.png"  # beside results.txt (a final evaluation) and the quickstart's results.md


@gin.configurable
def save_results(results, save_dir=gin.REQUIRED, step=None, overwrite=False, label=None, plot=True):
    """Appends (or with overwrite=True writes) one evaluation. label: the header in results.txt instead of
    "Final results" (the Evaluator passes "Before training (step 0)" for the evaluation before training).
    plot: after a final evaluation (no step, no label), draw its scores to results.png beside results.txt."""
    save_dir = expand(save_dir, "save_results.save_dir")
    os.makedirs(save_dir, exist_ok=True)
    if step is None:
        path, header = os.path.join(save_dir, RESULTS_FILE), f"{label or 'Final results'}:"
    else:
        path, header = os.path.join(save_dir, RESULTS_IN_TRAINING_FILE), f"Training step: {step}"
    with open(path, "w" if overwrite else "a") as f:
        f.write(f"{header}\n{results!r}\n\n")
    if plot and step is None and label is None:
        figure = os.path.join(save_dir, RESULTS_FIGURE)
        evaluation_bars(results, figure, f"{os.path.basename(os.path.abspath(save_dir))}: final results")
        log_images({"results": figure})
    return path


def aggregate(per_dataset: dict) -> dict:
    """Adds average_score (mean of the datasets' scores) and confidence (population std)."""
    scores = [r["score"] for r in per_dataset.values()]
    out = dict(per_dataset)
    out["average_score"] = round(statistics.fmean(scores), 4) if scores else None
    out["confidence"] = round(statistics.pstdev(scores), 4) if scores else None
    return out


def read_results(path: str) -> list:
    """[(header, results dict)] for every evaluation recorded in a results file, in file order."""
    entries, header = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                entries.append((header, ast.literal_eval(line)))
            elif line.endswith(":"):
                header = line[:-1]
    return entries
