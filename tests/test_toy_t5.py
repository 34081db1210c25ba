"""The embedded T5: its objectives, and that its rebuild script reproduces the shipped tokenizer and losses."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import subprocess_env

from colm.models import toy_t5
from colm.models.hf_loading import hf_tokenizer

TINY = "colm/models/tiny/toy_t5"


@pytest.fixture(scope="module")
def tok():
    return hf_tokenizer(TINY)


def test_span_corruption_hides_spans_and_the_target_is_the_whole_sequence():
    rng = np.random.default_rng(0)
    sentinels = list(range(1000, 1016))
    for n in (2, 5, 19, 40):
        ids = list(range(10, 10 + n))
        inputs, targets = toy_t5.span_corruption(ids, rng, sentinels, eos_id=1)
        assert targets == ids + [1] and inputs[-1] == 1
        used = [t for t in inputs if t in sentinels]
        assert used == sentinels[: len(used)] and len(used) >= 1
        kept = [t for t in inputs[:-1] if t not in sentinels]
        assert kept == sorted(kept) and set(kept) < set(ids)  # the rest, in order, with spans cut out
        hidden = n - len(kept)
        assert len(used) <= hidden <= max(1, round(0.15 * n)) + 1
        # a sentinel stands where each hidden span was: never two sentinels side by side
        assert all(not (a in sentinels and b in sentinels) for a, b in zip(inputs, inputs[1:]))


def test_prefix_lm_splits_a_sequence_into_prefix_and_continuation():
    rng = np.random.default_rng(1)
    ids = list(range(10, 30))
    for _ in range(20):
        inputs, targets = toy_t5.prefix_lm(ids, rng, eos_id=1)
        assert inputs[:-1] + targets[:-1] == ids and inputs[-1] == targets[-1] == 1 and len(inputs) > 1


def test_shipped_tokenizer_keeps_corpus_words_whole_and_reads_any_text(tok):
    text = "review : the soup was tasty and the waiter was rude ."
    assert len(tok(text, add_special_tokens=False).input_ids) == len(text.split())
    assert tok(text).input_ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    odd = "Zebra-42 xqz!"
    ids = tok(odd, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids) == odd
    assert tok.convert_tokens_to_ids("<extra_id_0>") != tok.unk_token_id


@pytest.mark.slow
def test_rebuild_reproduces_the_shipped_tokenizer_and_first_losses(tok, tmp_path):
    """scripts/make_tiny_t5.py is seeded and pinned to AVX2 kernels on one thread: rebuilding gives the
    shipped vocabulary and the logged loss of each of the first steps (the whole run takes ~20 minutes; the
    first steps on the same schedule are what a test can afford)."""
    with open(os.path.join(TINY, "pretraining_log.json")) as f:
        card = json.load(f)
    code = ("import json, sys\n"
            "from colm.utils.reproducible import set_reproducible_cpu_env\n"
            "set_reproducible_cpu_env()\n"
            "from colm.models.toy_t5 import build_toy_t5, FIRST_STEPS_LOGGED\n"
            f"model, tok, log = build_toy_t5({card['span_steps']}, {card['prefix_steps']}, {card['seed']}, "
            "stop_after=FIRST_STEPS_LOGGED)\n"
            "tok.save_pretrained(sys.argv[1])\n"
            "print(json.dumps(log))\n")
    env = subprocess_env(os.getcwd())
    for key in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads(done.stdout.strip().splitlines()[-1])
    assert hf_tokenizer(str(tmp_path)).get_vocab() == tok.get_vocab()
    shipped = card["log"][: toy_t5.FIRST_STEPS_LOGGED]
    assert [entry[:2] for entry in log] == [entry[:2] for entry in shipped]
    np.testing.assert_allclose([entry[2] for entry in log], [entry[2] for entry in shipped], rtol=0, atol=2e-5)
