"""Loading Hugging Face models and tokenizers by hub name or local directory.

The embedded tiny model (`colm/models/tiny/toy_t5`) is an ordinary HF directory, so it goes through the
same `from_pretrained` path as google/t5-xl-lm-adapt.
"""

import os

import gin
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from colm.utils.paths import expand
from colm.utils.progress import quiet_library_bars

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL_CLASSES = {
    "": transformers.AutoModel,
    "seq2seq_lm": transformers.AutoModelForSeq2SeqLM,
    "causal_lm": transformers.AutoModelForCausalLM,
}


def resolve_name_or_path(name_or_path: str) -> str:
    """A relative path that exists from the repository root works from any directory."""
    name_or_path = expand(name_or_path, "model_name_or_path")
    if not os.path.exists(name_or_path) and os.path.exists(os.path.join(REPO_ROOT, name_or_path)):
        return os.path.join(REPO_ROOT, name_or_path)
    return name_or_path


def _load(loader, name_or_path: str, what: str):
    quiet_library_bars()  # transformers draws a loading bar; not in a log file
    try:
        return loader(name_or_path)
    except OSError as error:
        raise OSError(
            f"Could not load the {what} {name_or_path!r}: {error}\n"
            "Without network access use MODEL_TYPE=tiny (the embedded model), or point "
            "hf_torch_model.model_name_or_path / hf_tokenizer.model_name_or_path at a local copy."
        ) from error


@gin.configurable
def hf_torch_model(model_name_or_path=gin.REQUIRED, model_class="seq2seq_lm"):
    if model_class not in MODEL_CLASSES:
        raise ValueError(f"hf_torch_model.model_class={model_class!r}; choose one of {sorted(MODEL_CLASSES)}.")
    path = resolve_name_or_path(model_name_or_path)
    return _load(MODEL_CLASSES[model_class].from_pretrained, path, "model")


@gin.configurable
def hf_tokenizer(model_name_or_path=gin.REQUIRED):
    path = resolve_name_or_path(model_name_or_path)
    return _load(transformers.AutoTokenizer.from_pretrained, path, "tokenizer")


def conv1d_as_linear(torch_model) -> int:
    """Replaces every transformers Conv1D (GPT-2's linears: y = x W + b with W of shape d_in x d_out) by the equal
    nn.Linear (weight W^T), in place, so that LoRA, experts, gates and sizes see nn.Linear in every architecture.
    The module names stay, so do the expert keys (`transformer.h.0.attn.c_attn._addons.expert_lora.layer1__0`);
    only the frozen base weight is stored transposed. Returns how many were replaced."""
    replaced = 0
    for module in list(torch_model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, Conv1D):
                continue
            d_in, d_out = child.weight.shape
            linear = nn.Linear(d_in, d_out, bias=child.bias is not None, device=child.weight.device,
                               dtype=child.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            linear.weight.requires_grad_(child.weight.requires_grad)
            setattr(module, child_name, linear)
            replaced += 1
    return replaced
