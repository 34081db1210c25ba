"""colm/utils/preloaded.py: commands run in forks of a preloaded Python behave as fresh processes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import subprocess_env

from colm.formats.checkpoint_io import read_checkpoint
from colm.utils import preloaded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIENT = [sys.executable, "-m", "colm.utils.preloaded", "run", "--"]


@pytest.fixture(scope="module")
def server():
    with preloaded.Server() as path:
        yield path


def _script(tmp_path, body):
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


REPORT = """
    import os, sys
    print("pid:", os.getpid())
    print("argv:", sys.argv[1:])
    print("cwd:", os.getcwd())
    print("flag:", os.environ.get("JOB_FLAG"))
    print("torch loaded before:", "torch" in sys.modules)
    print("line:", sys.stdin.readline().strip())
    print("to stderr", file=sys.stderr)
    sys.exit(3)
"""


def test_a_command_gets_argv_env_cwd_streams_and_exit_status(server, tmp_path):
    job = _script(tmp_path, REPORT)
    env = dict(os.environ, COLM_PRELOADED=server, JOB_FLAG="on")
    run = subprocess.run(CLIENT + [job, "a", "b c"], env=env, cwd=tmp_path, input="hello\n", capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 3
    out = dict(line.split(": ", 1) for line in run.stdout.splitlines())
    assert out["argv"] == "['a', 'b c']"
    assert out["cwd"] == str(tmp_path)
    assert out["flag"] == "on"
    assert out["torch loaded before"] == "True"  # it ran in the preloaded Python
    assert out["line"] == "hello"
    assert run.stderr.strip() == "to stderr"


def test_a_module_runs_as_with_python_m(server):
    run = subprocess.run(CLIENT + ["-m", "colm.models.model_gins", "tiny"], env=dict(os.environ, COLM_PRELOADED=server),
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    direct = subprocess.run([sys.executable, "-m", "colm.models.model_gins", "tiny"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert (run.returncode, run.stdout) == (direct.returncode, direct.stdout) and direct.returncode == 0


def test_an_uncaught_exception_exits_1_with_its_traceback(server, tmp_path):
    job = _script(tmp_path, "raise ValueError('broken on purpose')\n")
    run = subprocess.run(CLIENT + [job], env=dict(os.environ, COLM_PRELOADED=server), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert "ValueError: broken on purpose" in run.stderr


@pytest.mark.parametrize("why", ["no server", "other thread count"])
def test_without_a_usable_server_the_command_runs_as_a_plain_process(server, tmp_path, why):
    job = _script(tmp_path, REPORT)
    env = dict(os.environ, COLM_PRELOADED=server)
    if why == "no server":
        env["COLM_PRELOADED"] = str(tmp_path / "missing.sock")
    else:  # read when torch is imported: the preloaded Python cannot stand in
        env["OMP_NUM_THREADS"] = str(int(os.environ.get("OMP_NUM_THREADS", "1")) + 1)
    process = subprocess.Popen(CLIENT + [job], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    stdout, _ = process.communicate(timeout=60)
    out = dict(line.split(": ", 1) for line in stdout.splitlines())
    assert process.returncode == 3
    assert out["pid"] == str(process.pid)  # the client exec'd the command itself
    assert out["torch loaded before"] == "False"


def test_sigterm_to_the_client_reaches_the_command(server, tmp_path):
    started = tmp_path / "started"
    job = _script(tmp_path, f"""
        import signal, sys, time
        def stop(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, stop)
        open({str(started)!r}, "w").close()
        time.sleep(60)
    """)
    process = subprocess.Popen(CLIENT + [job], env=dict(os.environ, COLM_PRELOADED=server))
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM


@pytest.mark.slow
def test_a_launcher_run_through_the_server_writes_the_same_weights(in_tmp_repo):
    """The same 3-step expert training, as a plain process and through the preloaded Python: identical bits."""
    env = subprocess_env(in_tmp_repo)
    env.pop("COLM_PRELOADED", None)  # the plain run is a plain process
    bindings = ("main.logging_backend=None D/ToyDataset.num_examples=64 D/TOYSENTIMENT/EVAL/ToyDataset.num_examples=8 "
                "P/TRAIN/Trainer.num_steps=3 P/TRAIN/Trainer.validation_step_interval=3")
    with preloaded.Server(env=env) as path:
        for name, extra in (("plain", {}), ("preloaded", {"COLM_PRELOADED": path})):
            run = subprocess.run(["bash", "colm/experiments/bash_scripts/train_single_task_loralinear.sh", "-exp_name",
                                  name, "-dataset", "TOYSENTIMENT", "-extra_bindings", bindings],
                                 cwd=in_tmp_repo, env=dict(env, **extra), capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-2000:]
    plain, fast = (read_checkpoint(str(in_tmp_repo / "exp_out" / n / "best.pt")) for n in ("plain", "preloaded"))
    assert plain.keys() == fast.keys()
    assert all(torch.equal(plain[k], fast[k]) for k in plain)
