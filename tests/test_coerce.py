"""One strict boolean coercion (colm/utils/coerce.py), and the parameters that read "true" as False before it."""

import pytest
import torch

from colm.checkpoints.concatenate import reinit_router_commands
from colm.moma.feature_extractor import FeatureExtractor
from colm.moma.moe import FFNExperts, MoELink, Router
from colm.procedures.averaged_hiddens import SaveAveragedHiddens
from colm.utils.coerce import as_bool, as_optional_bool

BAD = ["yes", "1", "Flase", "", 1, 0, None, "None"]


def test_as_bool_reads_booleans_and_their_words_only():
    for value, expected in [(True, True), (False, False), ("True", True), ("False", False), ("true", True),
                            ("FALSE", False), (" true ", True)]:
        assert as_bool(value, "x") is expected
    for value in BAD:
        with pytest.raises(ValueError, match=r"^Thing\.flag must be True or False, got "):
            as_bool(value, "Thing.flag")


def test_as_optional_bool_keeps_none():
    assert as_optional_bool(None, "x") is None and as_optional_bool("None", "x") is None
    assert as_optional_bool("true", "x") is True and as_optional_bool(False, "x") is False
    with pytest.raises(ValueError, match="Thing.flag must be True or False, got 'no'"):
        as_optional_bool("no", "Thing.flag")


# ----- through the real constructors: each of these read "true" (and anything but True / "True") as False ----


def router(**kwargs):
    return Router({}, "encoder.block.0.layer.0.SelfAttention.q", MoELink(), ("h",), ("w",), torch.nn.Linear(8, 8),
                  None, d_router=8, **kwargs)


def experts(**kwargs):
    return FFNExperts({}, "encoder.block.0.layer.0.SelfAttention.q", MoELink(), ("w",), torch.nn.Linear(8, 8), None,
                      d_in=8, d_out=8, d_bottleneck=4, **kwargs)


LAX_BEFORE = {
    "FFNExperts.normalize_topk": (lambda v: experts(normalize_topk=v), lambda e: e.normalize_topk),
    "FFNExperts.divide_by_d_bottleneck": (lambda v: experts(divide_by_d_bottleneck=v), lambda e: e.scale == 0.25),
    "Router.scaling_scores": (lambda v: router(scaling_scores=v), lambda r: r.scaling_scores),
    "Router.is_retriever": (lambda v: router(is_retriever=v), lambda r: r.retrieval is not None),
    "SaveAveragedHiddens.decoder_last_step_only": (lambda v: SaveAveragedHiddens("out", decoder_last_step_only=v),
                                                   lambda p: p.decoder_last_step_only),
}


@pytest.mark.parametrize("parameter", list(LAX_BEFORE))
def test_lax_parameters_read_true_and_refuse_other_words(parameter):
    build, read = LAX_BEFORE[parameter]
    assert read(build("true")) is True and read(build("True")) is True and read(build(True)) is True
    assert read(build("false")) is False and read(build(False)) is False
    for value in ("yes", "1", "Flase"):
        with pytest.raises(ValueError, match=f"{parameter} must be True or False, got '{value}'"):
            build(value)


def test_other_boolean_parameters_are_strict():
    with pytest.raises(ValueError, match="Router.elementwise_affine must be True or False"):
        router(elementwise_affine="no")
    with pytest.raises(NotImplementedError):
        router(elementwise_affine="true")
    assert router(center_inputs="true").center_inputs is True and router(center_inputs="auto").center_inputs == "auto"
    with pytest.raises(ValueError, match="Router.center_inputs='Flase'; choose 'auto'"):
        router(center_inputs="Flase")
    assert FeatureExtractor({}, "encoder", ("k",), include_answer_choices="true").include_answer_choices is True
    assert "-compute_hiddens True" in reinit_router_commands({"Toy": "TOY"}, compute_hiddens="true")
    with pytest.raises(ValueError, match="run_concatenate.compute_hiddens must be True or False, got 'yes'"):
        reinit_router_commands({"Toy": "TOY"}, compute_hiddens="yes")
