"""Imports every module that registers gin configurables, so gin files can name them."""

from colm import registry  # noqa: F401  build
from colm.datasets import families
from colm.models import hf_loading, model  # noqa: F401
from colm.moma import hiddens, lora, moe, weights  # noqa: F401
from colm.procedures import (  # noqa: F401
    analysis,
    averaged_hiddens,  # noqa: F401  SaveAveragedHiddens
    batchers,
    evaluator,
    optim,
    results,
    retriever,
    trainer,
)
from colm.utils import logging  # noqa: F401

families.import_all()  # every dataset family, its metrics and colm.datasets.settings (setting_scopes, suite_scopes)
