"""FeatureExtractor: the retrieval baseline's router input, a sentence embedding of each example's text.

`insert_feature_extractor` puts one FeatureExtractor on the encoder stack. Before the encoder runs it
embeds every example of the raw batch (needs `Model.pass_batch_input=True`) with all-MiniLM-L6-v2 and
writes the (rows, 384) embeddings under ("hidden_states", <addon name>, <module>), where a retrieval
Router (`Router.is_retriever=True`, made by make_moe with expose_hiddens_addon_name="feature_extractor";
colm/moma/retrieval_routing.py) reads them.
"""

import gin
import torch

from colm.moma.addons import Addon
from colm.moma.embedder import DEFAULT_MODEL, embed_texts
from colm.utils.coerce import as_bool


def example_text(input_str: str, answer_choices, include_answer_choices: bool) -> str:
    """The text embedded for one example (and for one library item)."""
    if not include_answer_choices:
        return input_str
    choices = ", ".join(answer_choices) if answer_choices else "None"
    return f"Answer Choices: {choices}, Instance: {input_str}"


def batch_texts(batch: dict, include_answer_choices: bool) -> list:
    """example_text for every example of a collated batch; choices are looked up per example, so an example
    without choices gets "None" even when others in its batch have some (the original's defect 16)."""
    if "input_str" not in batch:
        raise KeyError(f"The batch has no 'input_str' (keys: {sorted(batch)}); the FeatureExtractor embeds it.")
    inputs = batch["input_str"]
    choices = batch.get("answer_choices") or [None] * len(inputs)
    return [example_text(text, c, include_answer_choices) for text, c in zip(inputs, choices)]


@gin.configurable
class FeatureExtractor(Addon):
    has_pre_forward = True

    def __init__(self, global_hidden_dict, host_name, write_key, model_name=DEFAULT_MODEL,
                 include_answer_choices=False, batch_size=64):
        super().__init__(global_hidden_dict, host_name)
        self.write_key = write_key  # make_moe hands this key to the router
        self.model_name = model_name
        self.include_answer_choices = as_bool(include_answer_choices, "FeatureExtractor.include_answer_choices")
        self.batch_size = batch_size

    def pre_forward(self, args, kwargs):
        batch = self.global_hidden_dict.get("batch_input")
        if batch is None:
            raise RuntimeError(f"FeatureExtractor on {self.host_name!r} needs the raw batch: set "
                               "M/MODEL/Model.pass_batch_input=True.")
        inputs = kwargs.get("input_ids")
        if inputs is None:
            inputs = kwargs.get("inputs_embeds", args[0] if args else None)
        texts = batch_texts(batch, self.include_answer_choices)
        device = inputs.device if isinstance(inputs, torch.Tensor) else torch.device("cpu")
        embeddings = embed_texts(texts, self.batch_size, self.model_name, device)
        rows = inputs.shape[0] if isinstance(inputs, torch.Tensor) else len(texts)
        if rows != len(texts):
            # The encoder may see each example several times in a row (beams, repeated inputs).
            if rows % len(texts):
                raise ValueError(f"FeatureExtractor: the encoder got {rows} rows for {len(texts)} examples.")
            embeddings = embeddings.repeat_interleave(rows // len(texts), dim=0)
        self.global_hidden_dict[self.write_key] = embeddings
        return None


@gin.configurable
def insert_feature_extractor(model, feature_extractor_module="encoder",
                             feature_extractor_addon_name="feature_extractor"):
    hosts = model.match_modules(feature_extractor_module)
    if len(hosts) != 1:
        raise ValueError(f"insert_feature_extractor: feature_extractor_module={feature_extractor_module!r} must match "
                         f"exactly one module (the encoder stack), matched {sorted(hosts)[:5]}.")
    (name,) = hosts
    key = ("hidden_states", feature_extractor_addon_name, name)
    addon = FeatureExtractor(model.global_hidden_dict, name, key)
    # "first": the embeddings must be there before the router on the same module reads them.
    model.insert_addon(name, feature_extractor_addon_name, addon, order="first")
