"""Run logging (colm/utils/logging.py) and progress output (colm/utils/progress.py).

wandb is replaced by a recording stand-in except in the one test that runs it offline for real.
"""

import io
import os
import sys
import types
from importlib.machinery import ModuleSpec

import gin
import pytest

from colm import registry
from colm.datasets.toy import TOY_GIN
from colm.ginparse import parse_gin
from colm.main import main
from colm.tools import dataset_info as info
from colm.utils import logging as run_logging
from colm.utils import progress

NO_LOGIN = "none: no wandb login and WANDB_MODE is unset"


def write_netrc(path, host, password="0123456789abcdef"):
    path.write_text(f"machine {host}\n  login user\n  password {password}\n")
    os.chmod(path, 0o600)
    return str(path)


def test_backend_decision(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    bare = {"HOME": str(home)}
    decide = run_logging.decide_backend
    assert decide(None, bare)[:2] == (None, None) and decide("None", bare)[:2] == (None, None)
    backend, mode, why = decide("wandb", bare)
    assert (backend, mode) == (None, None) and why.startswith(NO_LOGIN) and "wandb login" in why
    assert decide("wandb", {**bare, "WANDB_MODE": "offline"})[:2] == ("wandb", "offline")
    assert decide("wandb", {**bare, "WANDB_MODE": "online"})[:2] == ("wandb", "online")
    assert decide("wandb", {**bare, "WANDB_MODE": "disabled", "WANDB_API_KEY": "k"})[:2] == (None, None)
    assert decide("wandb", {**bare, "WANDB_API_KEY": "k"})[:2] == ("wandb", "online")
    # `wandb login` writes a netrc entry for its host; another host's entry is no wandb login.
    write_netrc(home / ".netrc", "example.org")
    assert decide("wandb", bare)[0] is None
    write_netrc(home / ".netrc", "api.wandb.ai")
    assert decide("wandb", bare)[:2] == ("wandb", "online")
    elsewhere = write_netrc(tmp_path / "netrc", "wandb.example.com")
    assert decide("wandb", {**bare, "NETRC": elsewhere})[0] is None
    assert decide("wandb", {**bare, "NETRC": elsewhere, "WANDB_BASE_URL": "https://wandb.example.com"})[0] == "wandb"
    with pytest.raises(ValueError, match="not supported"):
        decide("tensorboard", bare)


class FakeRun:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.config = dict(kwargs.get("config") or {})
        self.logged = []
        self.finished = False
        self.dir = os.path.join(kwargs["dir"], "wandb", "run-1", "files")

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


class FakeConfig(dict):
    def update(self, values, allow_val_change=False):
        super().update(values)


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []

    def init(**kwargs):
        run = FakeRun(**kwargs)
        run.config = FakeConfig(run.config)
        runs.append(run)
        return run

    # a module spec, so that libraries probing for wandb (accelerate's find_spec) take it for a package
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, __spec__=ModuleSpec("wandb", None)))
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    yield runs
    run_logging.finish_logger()


def toy_scope():
    """A toy task with a TRAIN and an EVAL scope, whatever the toy world calls it."""
    parse_gin([TOY_GIN], [])
    trains, evals = info.select_scopes(["D/*/TRAIN"]), set(info.select_scopes(["D/*/EVAL"]))
    gin.clear_config()
    registry.reset()
    return next(s[: -len("/TRAIN")] for s in trains if s.replace("/TRAIN", "/EVAL") in evals)


def test_a_training_run_logs_its_gin_config_train_loss_and_eval_scores(fake_wandb, in_tmp_repo, monkeypatch, capsys):
    scope = toy_scope()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("EXP_NAME", "wb_run")
    parse_gin(["colm/datasets/toy.gin", "colm/models/tiny/t5.gin", "colm/models/moe_lora_rank16.gin",
               "colm/experiments/train_single_task_loralinear.gin", "colm/experiments/wandb.gin"],
              [f'P/TRAIN/Trainer.datasets="{scope}/TRAIN"', f'P/EVALUATE/Evaluator.datasets="{scope}/EVAL"',
               "P/TRAIN/Trainer.num_steps=4", "P/TRAIN/Trainer.gradient_accumulation_factor=1",
               "P/TRAIN/Trainer.validation_step_interval=2", "P/TRAIN/Trainer.report_step_interval=2"])
    main()
    out = capsys.readouterr()
    (run,) = fake_wandb
    # wandb adds its own `wandb` folder under dir: exp_out/<exp_name>/wandb/, not wandb/wandb/.
    assert run.kwargs["dir"] == "exp_out/wb_run" and run.kwargs["mode"] == "offline" and run.kwargs["name"] == "wb_run"
    assert out.out.splitlines()[0] == "[colm] logging: wandb, mode offline (WANDB_MODE=offline); run files in " \
                                      "exp_out/wb_run/wandb/run-1"
    # The config is the gin config the run used.
    assert run.config["P/TRAIN/Trainer.num_steps"] == "4"
    assert run.config["P/TRAIN/get_optimizer.learning_rate"] == "0.005"
    assert run.config["P/EVALUATE/Evaluator.datasets"] == f"'{scope}/EVAL'"
    keys = {key for _, data in run.logged for key in data}
    assert {"P/TRAIN/loss", "P/TRAIN/lr"} <= keys
    assert "P/EVALUATE/average_score" in keys and any(k.startswith(f"P/EVALUATE/{scope}/EVAL/") for k in keys)
    eval_steps = [step for step, data in run.logged if "P/EVALUATE/average_score" in data]
    assert eval_steps[:3] == [0, 2, 4]
    assert run.finished
    # Output is captured, not a terminal: plain progress lines, no carriage-return frames.
    assert "[colm] P/TRAIN step 2/4: loss " in out.out and "[colm] P/TRAIN step 4/4: loss " in out.out
    assert "\r" not in out.out + out.err


def test_no_login_means_no_remote_logging_and_a_line_that_says_how(fake_wandb, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    run_logging.setup_logger("wandb", "x")
    assert fake_wandb == [] and run_logging._STATE["run"] is None
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"[colm] logging: {NO_LOGIN}") and "WANDB_MODE=offline" in line
    run_logging.log_metrics({"P/TRAIN": {"loss": 1.0}}, 1)  # a no-op, not an error


def test_a_wandb_that_cannot_start_does_not_stop_the_run(monkeypatch, capsys):
    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])\nmore")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=refuse, __spec__=ModuleSpec("wandb", None)))
    monkeypatch.setenv("WANDB_MODE", "online")
    run_logging.setup_logger("wandb", "x")
    assert run_logging._STATE["run"] is None
    line = capsys.readouterr().out.strip()
    assert line.startswith("[colm] logging: none: wandb could not start (RuntimeError: api_key not configured")
    assert "\n" not in line


def test_gin_config_dict_joins_wrapped_values():
    text = ("# Parameters for M/MODEL/modify_with_lora:\n# ====\nM/MODEL/modify_with_lora.lora_layers = 'q|k'\n"
            "M/MODEL/modify_with_lora.lora_modules = \\\n    '.*SelfAttention|.*DenseReluDense'\n\n"
            "P/EVALUATE/Evaluator.datasets = \\\n    ['D/A/EVAL',\n     'D/B/EVAL']\n")
    assert run_logging.gin_config_dict(text) == {
        "M/MODEL/modify_with_lora.lora_layers": "'q|k'",
        "M/MODEL/modify_with_lora.lora_modules": "'.*SelfAttention|.*DenseReluDense'",
        "P/EVALUATE/Evaluator.datasets": "['D/A/EVAL', 'D/B/EVAL']",
    }


@pytest.mark.slow
def test_real_wandb_offline_writes_one_wandb_folder(in_tmp_repo, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("EXP_NAME", "offline_run")
    parse_gin(["colm/experiments/wandb.gin"], [])
    try:
        run_logging.setup_logger("wandb", "offline_run")
        run_logging.log_metrics({"P/EVALUATE": {"average_score": 0.5}}, 0)
    finally:
        run_logging.finish_logger()
    runs = list((in_tmp_repo / "exp_out/offline_run/wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert not (in_tmp_repo / "exp_out/offline_run/wandb/wandb").exists()
    assert "[colm] logging: wandb, mode offline" in capsys.readouterr().out


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_draw_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress.progress(range(3)).disable
    assert not progress.progress(range(3), disable=False).disable
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.progress(range(3))
    assert not bar.disable
    list(bar)
    assert "\r" in sys.stderr.getvalue()  # on a terminal the bar redraws in place, as it should


def unset(monkeypatch, name):
    """Deletes an environment variable so that the test's end restores it, present or not."""
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def test_library_bars_are_off_when_not_on_a_terminal(monkeypatch):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    hub_was_off = hub_utils.are_progress_bars_disabled()
    try:
        monkeypatch.setattr(sys, "stderr", Tty())
        unset(monkeypatch, "HF_HUB_DISABLE_PROGRESS_BARS")
        unset(monkeypatch, "HF_DATASETS_DISABLE_PROGRESS_BARS")
        assert not progress.quiet_library_bars() and "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ
        monkeypatch.setattr(sys, "stderr", io.StringIO())
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
        transformers_logging.enable_progress_bar()
        assert progress.quiet_library_bars() and transformers_logging.is_progress_bar_enabled()
        monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
        assert progress.quiet_library_bars()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" == os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"]
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
        if not hub_was_off:
            hub_utils.enable_progress_bars()
