"""Tests of colm.tools.dataset_info and scripts/get_dataset_info.py on the toy registry with ByT5's byte tokenizer."""

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
from transformers import ByT5Tokenizer

from colm import registry
from colm.datasets.toy import TOY_GIN
from colm.tools import dataset_info as info

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tok():
    return ByT5Tokenizer()


def byt5_length(text):
    """ByT5 counts one token per UTF-8 byte, plus </s>."""
    return len(text.encode("utf-8")) + 1


def test_stats_match_direct_computation(tok):
    # Inputs are "reverse the list : <3-5 grocery items>" = 40-60 bytes with </s>: a max_length of 50 cuts some.
    info.parse_config([TOY_GIN], ["D/TOYREVERSE/EVAL/ToyDataset.max_length = 50"])
    rows = info.collect(["D/TOYREVERSE/EVAL", "D/TOYRULING/EVAL"], tok, progress=False)
    assert [r["scope"] for r in rows] == ["D/TOYREVERSE/EVAL", "D/TOYRULING/EVAL"]
    assert not any("error" in r for r in rows)
    reverse, vowel = rows

    dataset = registry.get_object("D/TOYREVERSE/EVAL")
    dataset.set_tokenizer(tok)
    examples = [dataset.get_example(i) for i in range(len(dataset))]
    inputs = np.array([byt5_length(ex["input_str"]) for ex in examples])
    targets = np.array([byt5_length(ex["target_str"]) for ex in examples])
    assert reverse["examples"] == reverse["measured"] == len(dataset) == 200
    assert reverse["max_length"] == 50 and reverse["interface"] == "gen" and reverse["metrics"] == ["exact_match"]
    for got, lengths in ((reverse["input_tokens"], inputs), (reverse["target_tokens"], targets)):
        assert got["mean"] == pytest.approx(lengths.mean())
        assert got["p50"] == pytest.approx(np.median(lengths))
        assert got["p95"] == pytest.approx(np.percentile(lengths, 95))
        assert got["max"] == lengths.max()
    assert reverse["input_tokens"]["max"] == max(len(ex["input_str"].encode()) for ex in examples) + 1
    truncated = np.mean(inputs > 50)
    assert 0 < truncated < 1 and reverse["input_truncated"] == pytest.approx(truncated)
    # The same examples are the ones the dataset itself cuts to max_length.
    assert np.mean([len(dataset[i]["input_ids"]) == 50 and inputs[i] > 50 for i in range(len(dataset))]) == truncated
    assert reverse["target_truncated"] == 0.0
    assert reverse["answer_choices"] == {"min": 0, "mean": 0.0, "max": 0}
    # Classification: acceptable/unacceptable; max_length 96 from the registry cuts nothing.
    assert vowel["answer_choices"] == {"min": 2, "mean": 2.0, "max": 2}
    assert vowel["interface"] == "mc" and vowel["input_truncated"] == 0.0 and vowel["max_length"] == 96


def test_sample_of_examples(tok):
    info.parse_config([TOY_GIN])
    [row] = info.collect(["D/TOYSUMMARY/EVAL"], tok, max_examples=50, seed=3, progress=False)
    assert row["examples"] == 200 and row["measured"] == 50
    dataset = registry.get_object("D/TOYSUMMARY/EVAL")
    chosen = info.sample_indices(200, 50, seed=3)
    assert len(set(chosen.tolist())) == 50
    lengths = [byt5_length(dataset.get_example(int(i))["input_str"]) for i in chosen]
    assert row["input_tokens"]["mean"] == pytest.approx(np.mean(lengths))


def test_select_scopes():
    info.parse_config([TOY_GIN])
    evals = info.select_scopes(["D/TOY*/EVAL"])
    assert "D/TOYREVERSE/EVAL" in evals and "D/TOYFILMSENTIMENT/EVAL" in evals
    assert not any(s.endswith("/TRAIN") for s in evals)
    assert info.select_scopes(["D/TOYREVERSE/*", "D/TOYREVERSE/EVAL"]) == ["D/TOYREVERSE/EVAL", "D/TOYREVERSE/TRAIN"]
    assert info.select_scopes(["D/NOPE/EVAL"]) == ["D/NOPE/EVAL"]  # plain names are kept, reported when built
    with pytest.raises(ValueError, match="'D/P3\\*/EVAL' matches none"):
        info.select_scopes(["D/P3*/EVAL"])


def test_failures_are_reported_and_the_rest_measured(tok):
    info.parse_config([TOY_GIN], ['D/TOYSUMMARY/EVAL/ToyDataset.task = "nope"'])
    rows = info.collect(["D/TOYSUMMARY/EVAL", "D/TOYREVERS/EVAL", "D/TOYREVERSE/EVAL"], tok, progress=False)
    assert "is not a toy task" in rows[0]["error"]
    assert "Unknown scope" in rows[1]["error"] and "D/TOYREVERSE/EVAL" in rows[1]["error"]  # close match
    assert "error" not in rows[2] and rows[2]["examples"] == 200
    table = info.format_table(rows)
    assert table.splitlines()[1].startswith("D/TOYREVERSE/EVAL")
    assert "FAILED D/TOYSUMMARY/EVAL: ValueError" in table


def load_script():
    spec = importlib.util.spec_from_file_location("get_dataset_info", os.path.join(REPO_ROOT, "scripts/get_dataset_info.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_json_and_csv_and_exits_nonzero_on_failure(tmp_path, capsys):
    script = load_script()
    code = script.main(["--gin_files", "colm/datasets/toy.gin", "--scopes", "D/TOYDIAGNOSIS/EVAL", "D/NOPE/EVAL",
                        "--model_gin", "colm/models/tiny/t5.gin", "--save", "--out_dir", str(tmp_path),
                        "--name", "toy"])
    assert code == 1
    out = capsys.readouterr()
    assert "FAILED D/NOPE/EVAL" in out.out and "1 of 2 dataset(s) failed" in out.err
    rows = json.loads((tmp_path / "toy.json").read_text())
    assert rows[0]["scope"] == "D/TOYDIAGNOSIS/EVAL" and rows[0]["answer_choices"]["max"] == 2
    assert "Unknown scope" in rows[1]["error"]
    with open(tmp_path / "toy.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[0]["input_tokens_p95"]) == rows[0]["input_tokens"]["p95"]
    assert table[1]["scope"] == "D/NOPE/EVAL" and table[1]["error"]


def test_cli_all_good_exits_zero(capsys):
    script = load_script()
    assert script.main(["--gin_files", "colm/datasets/toy.gin", "--scopes", "D/TOYQA/EVAL", "--tokenizer", "byt5",
                        "--max_examples", "0"]) == 0
    assert "D/TOYQA/EVAL  200" in capsys.readouterr().out


def test_cli_usage_errors_exit_2(capsys):
    script = load_script()
    assert script.main(["--gin_files", "colm/datasets/toy.gin", "--scopes", "D/P3*/EVAL", "--tokenizer", "byt5"]) == 2
    assert "matches none" in capsys.readouterr().err
    assert script.main(["--gin_files", "no/such.gin", "--scopes", "D/TOYSUMMARY/EVAL", "--tokenizer", "byt5"]) == 2
    assert "Gin file(s) not found" in capsys.readouterr().err


def test_tokenizer_needs_a_model_gin_or_a_choice():
    info.parse_config([TOY_GIN])
    with pytest.raises(ValueError, match="model gin file.*'byt5'"):
        info.load_tokenizer()


def test_cli_takes_the_tokenizer_of_the_model_type_in_use(monkeypatch, capsys):
    """Without --model_gin or --tokenizer the script counts with colm/models/$MODEL_TYPE/t5.gin's tokenizer:
    the tiny model's under MODEL_TYPE=tiny (no hub; the tests run offline), T5-XL's when MODEL_TYPE is unset."""
    import gin

    info.parse_config([TOY_GIN])
    scope = info.select_scopes(["D/*/EVAL"])[0]
    gin.clear_config()
    registry.reset()
    script = load_script()
    parsed = []
    parse_config = info.parse_config

    def recording(files, bindings=()):
        parsed.append(list(files))
        return parse_config(files, bindings)

    monkeypatch.setattr(info, "parse_config", recording)
    monkeypatch.setenv("MODEL_TYPE", "tiny")
    assert script.main(["--gin_files", TOY_GIN, "--scopes", scope, "--max_examples", "5"]) == 0
    assert parsed[-1] == [TOY_GIN, "colm/models/tiny/t5.gin"]
    assert f"{scope}  " in capsys.readouterr().out
    gin.clear_config()
    registry.reset()
    monkeypatch.delenv("MODEL_TYPE")
    monkeypatch.setattr(info, "load_tokenizer", lambda name=None: (_ for _ in ()).throw(OSError("no hub here")))
    assert script.main(["--gin_files", TOY_GIN, "--scopes", scope]) == 2
    assert parsed[-1] == [TOY_GIN, "colm/models/t5xl/t5.gin"]
