"""Datasets, metrics and tokenization; importing this registers the gin configurables."""

import os

from colm.datasets.dataset import Dataset, InterfaceInfo, special_ids, tokenize
from colm.datasets.local import LocalDataset, resolve_local_source
from colm.datasets.metrics import Scorer, compute_metrics
from colm.datasets.toy import TASKS, ToyDataset

TOY_GIN = os.path.join(os.path.dirname(__file__), "toy.gin")

__all__ = [
    "Dataset",
    "InterfaceInfo",
    "LocalDataset",
    "TASKS",
    "Scorer",
    "TOY_GIN",
    "ToyDataset",
    "compute_metrics",
    "resolve_local_source",
    "special_ids",
    "tokenize",
]
