import os

# No network here: every loader must work offline, and wandb must not try to log in.
for var, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                   # Tiny models gain nothing from intra-op threads, and spinning OpenMP threads slow
                   # everything tenfold when another process shares the two cores.
                   "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(var, value)

import gin  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from colm import configurables, registry  # noqa: E402,F401

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_T5 = os.path.join(REPO_ROOT, "colm/models/tiny/toy_t5")


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    registry.reset()
    yield
    gin.clear_config()
    registry.reset()


@pytest.fixture
def make_model():
    """Builds the tiny T5 Model (fresh weights from disk) with the given init moma calls."""
    from colm.models.hf_loading import hf_tokenizer, hf_torch_model
    from colm.models.model import Model

    def make(init_moma_calls=(), trainable_params="all", device="cpu"):
        torch.manual_seed(0)
        return Model(name="M/MODEL", torch_model=hf_torch_model(TINY_T5), tokenizer=hf_tokenizer(TINY_T5),
                     init_moma_calls=init_moma_calls, trainable_params=trainable_params, device=device)

    return make


@pytest.fixture
def in_tmp_repo(tmp_path, monkeypatch):
    """Runs a test from a temporary directory whose exp_out/ is private, with the repo's files reachable."""
    for name in ("colm", "exp_launch", "scripts"):
        os.symlink(os.path.join(REPO_ROOT, name), tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_random_moe_checkpoint(path, n_experts=2):
    """A tiny-T5 MoE checkpoint (rank-16 experts and routers at every linear) with random values."""
    from colm.formats.checkpoint_io import write_checkpoint
    from colm.ginparse import parse_gin
    from colm.moma.moe import extend_moe

    parse_gin(["colm/models/tiny/t5.gin", "colm/models/tiny/moe_lora_rank16_a2.gin"], ["M/MODEL/Model.device='cpu'"])
    model = registry.get_object("M/MODEL")
    extend_moe(model, num_new_experts=n_experts)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) * 0.1
             for k, v in model.torch_model.state_dict().items() if "_addons" in k}
    write_checkpoint(state, str(path))
    gin.clear_config()
    registry.reset()


_PRELOADED = {}  # this test process's preloaded Python (colm/utils/preloaded.py), started on first use


@pytest.fixture(autouse=True)
def _preload_for_slow_tests(request):
    """Tests marked slow (whole launcher runs) start their commands from the preloaded Python; the inner loop's
    tests run few and short commands, for which starting one would cost more than it saves."""
    _PRELOADED["wanted"] = request.node.get_closest_marker("slow") is not None
    yield


def _preloaded_python(env):
    """The socket of a preloaded Python started with `env`: launchers and scripts run by the tests start from it
    instead of importing torch and transformers again (the same results; tests/test_preloaded.py). The README
    replays run plain processes, as a user's shell does; COLM_TEST_PLAIN_PROCESSES=1 makes every test do so.
    Only tests marked slow use it (`_preload_for_slow_tests`)."""
    if "server" not in _PRELOADED:
        import atexit

        from colm.utils import preloaded

        server = preloaded.Server(env=env)
        atexit.register(server.close)
        _PRELOADED["server"], _PRELOADED["path"] = server, server.wait_ready()
    return _PRELOADED["path"]


def subprocess_env(cwd):
    """Environment for running launchers and scripts as a user would, from `cwd`, with this interpreter. The
    repository is on PYTHONPATH (the temporary repos link to its files), the same for every test, so that one
    preloaded Python serves them all."""
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLM_ROOT", "EXP_NAME", "DATASET", "COLM_PRELOADED")}
    env.update(MODEL_TYPE="tiny", PYTHON_EXEC=sys.executable, COLM_NO_VENV="1",
               PATH=f"{os.path.dirname(sys.executable)}:{env['PATH']}",
               PYTHONPATH=f"{REPO_ROOT}:{env.get('PYTHONPATH', '')}")
    if _PRELOADED.get("wanted") and os.environ.get("COLM_TEST_PLAIN_PROCESSES") != "1":
        env["COLM_PRELOADED"] = _preloaded_python(env)
    return env


@pytest.fixture
def launch(in_tmp_repo):
    """launch(script, *flags): runs colm/experiments/bash_scripts/<script> from the temporary repo; asserts success."""
    import subprocess

    def run(script, *flags, expect_ok=True):
        done = subprocess.run(["bash", f"colm/experiments/bash_scripts/{script}", *flags], cwd=in_tmp_repo,
                              env=subprocess_env(in_tmp_repo), capture_output=True, text=True)
        if expect_ok:
            assert done.returncode == 0, done.stderr[-3000:]
        return done

    return run
