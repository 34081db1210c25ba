"""The README's commands, run the way a new user runs them, so the README cannot rot.

Each fenced block that runs on the embedded default (it names `MODEL_TYPE=tiny` or `colm/models/tiny/`)
is replayed in a new shell with a clean environment: a fresh HOME, a system PATH without the project's
virtual environment, LANG and TMPDIR, and nothing the test harness has exported (no HF offline variables,
no WANDB_MODE, no PYTHONPATH, no MODEL_TYPE). The shell runs the README's setup block (the one that
sources exp_launch/setup_environment_variable.sh), then the block under `set -euo pipefail`, so any
failing line fails the test. The T5-XL blocks document the same commands at full size.

The checks on outputs are read off the commands themselves (exp names, evaluated scopes, concatenated
datasets), so they hold whatever the toy tasks are called.
"""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO_ROOT

from colm.formats.checkpoint_io import read_checkpoint
from colm.procedures.results import read_results

README = os.path.join(REPO_ROOT, "README.md")
SETUP = "source exp_launch/setup_environment_variable.sh"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAUNCHERS = "colm/experiments/bash_scripts/"


def bash_blocks():
    return re.findall(r"```bash\n(.*?)```", open(README).read(), flags=re.S)


def setup_block():
    """The README's block that prepares a new shell (it sources the setup script and does nothing else)."""
    blocks = [b for b in bash_blocks() if SETUP in b]
    assert len(blocks) == 1, f"the README has one block that runs `{SETUP}`"
    lines = [line for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert lines and all(line.startswith("source ") for line in lines), blocks[0]
    return blocks[0]


def embedded_blocks():
    return [b for b in bash_blocks() if "MODEL_TYPE=tiny" in b or "colm/models/tiny/" in b]


def clean_env(root):
    """A new user's login environment: what a fresh shell has before the README's setup block."""
    home, tmp = root / "home", root / "tmp"
    home.mkdir(exist_ok=True)
    tmp.mkdir(exist_ok=True)
    return {"HOME": str(home), "PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "TMPDIR": str(tmp),
            # Not a README step and no change to any result: the tiny models gain nothing from intra-op
            # threads, and OpenMP threads spinning on this shared 2-core machine slow every step tenfold.
            "OMP_NUM_THREADS": "1"}


@pytest.fixture
def user_repo(tmp_path):
    """A checkout with its .venv (as either README command leaves it) and a private exp_out/, plus a user root."""
    repo = tmp_path / "colm"
    repo.mkdir()
    for name in ("colm", "exp_launch", "scripts"):
        os.symlink(os.path.join(REPO_ROOT, name), repo / name)
    os.symlink(sys.prefix, repo / ".venv")  # the environment these tests run in is the project's
    return repo


def new_shell(script, repo, setup=True):
    """Runs `script` in a new bash with a clean environment, after the README's setup block if `setup`."""
    text = f"{setup_block()}\n{script}" if setup else script
    return subprocess.run(["bash", "--noprofile", "--norc", "-euo", "pipefail", "-c", text], cwd=repo,
                          env=clean_env(repo.parent), capture_output=True, text=True)


def test_setup_block_makes_the_bare_python_the_projects(user_repo):
    probe = 'command -v python || echo "no python"; python -c "import gin, torch, colm; print(colm.__file__)"'
    bare = new_shell(probe, user_repo, setup=False)
    # Without the setup block the clean shell has no python of the project: the control that makes the
    # replays below mean something.
    assert not bare.stdout.startswith(str(user_repo / ".venv")), bare.stdout
    assert bare.returncode != 0
    done = new_shell(probe, user_repo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == str(user_repo / ".venv/bin/python")
    assert done.stdout.splitlines()[1].startswith(str(user_repo / "colm"))
    # Sourcing twice (a second block in the same shell) keeps one venv entry first on PATH.
    twice = new_shell(f'{SETUP}\necho "$PATH"', user_repo)
    assert twice.stdout.strip() == f"{user_repo / '.venv/bin'}:{SYSTEM_PATH}"


def test_setup_block_leaves_the_hugging_face_cache_where_the_user_has_it(user_repo):
    show = 'echo "HF_HOME=${HF_HOME:-unset} HUB=${HUGGINGFACE_HUB_CACHE:-unset}"'
    done = new_shell(show, user_repo)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "HF_HOME=unset HUB=unset"
    assert not (user_repo.parent / "home/.cache").exists()
    mine = new_shell(f"export HF_HOME=/data/hf\n{SETUP}\n{show}", user_repo, setup=False)
    assert mine.stdout.strip() == "HF_HOME=/data/hf HUB=unset"


# --- replaying the blocks --------------------------------------------------------------------------------


def commands(block):
    """The block's command lines: continuations joined, comments dropped, its 'quoted' variables expanded."""
    text = block.replace("\\\n", " ")
    variables = dict(re.findall(r"^(\w+)='([^']*)'$", text, flags=re.M))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        for name in sorted(variables, key=len, reverse=True):  # $EVAL before $E
            line = line.replace("${%s}" % name, variables[name]).replace(f"${name}", variables[name])
        out.append(line)
    return out


def flag(command, name):
    """The value of a launcher flag when it is a plain word without shell variables, else None."""
    match = re.search(rf"\s-{name}\s+([^\s\"']+)", command)
    return match.group(1) if match and "$" not in match.group(1) else None


def binding(command, name):
    """The quoted string value of `name="value"` in a command, when it has no shell variables."""
    match = re.search(rf'{re.escape(name)}=\\?"([^"\\$]+)\\?"', command)
    return match.group(1) if match else None


def last_results(repo, exp):
    path = repo / "exp_out" / exp / "results.txt"
    assert path.is_file(), f"no {path}"
    return read_results(str(path))[-1][1]


def check_launcher(command, repo):
    """Outputs of one launcher call: checkpoints of training, results with every dataset evaluated."""
    script = re.search(rf"{LAUNCHERS}(\w+)\.sh", command).group(1)
    exp = flag(command, "exp_name")
    if exp is None or "-make_expert_library True" in command:
        return
    if "-create_checkpoint True" in command:
        assert (repo / "exp_out" / exp / "best.pt").is_file(), command
        return
    scopes = set(re.findall(r"D/[A-Z0-9_]+/EVAL", command))
    dataset = flag(command, "dataset")
    if not scopes and dataset:
        scopes = {f"D/{dataset}/EVAL"}
    if script.startswith("train") or script == "reinit_router_embedding":
        assert (repo / "exp_out" / exp / "best.pt").is_file(), command
    if script == "reinit_router_embedding":
        return
    assert scopes or script.startswith("train"), f"no evaluated dataset in {command}"
    results = last_results(repo, exp)  # a multitask run evaluates its setting's datasets
    assert scopes <= set(results) and results.get("average_score") is not None, (command, sorted(results))
    names = {scope.replace("/", "_") for scope in scopes}
    if "@RoutingDistribution()" in command:
        for name in names:
            for ext in ("safetensors", "png"):
                assert (repo / "exp_out" / exp / "routing_distribution" / f"{name}.{ext}").is_file(), (command, name)
    if "@WriteOutputText()" in command:
        for name in names:
            assert (repo / "exp_out" / exp / "output_text" / f"{name}.json").is_file(), (command, name)


def experts(state, kind="expert_lora.layer1"):
    """{module: number of experts} of a checkpoint."""
    counts = {}
    for key in state:
        if f"._addons.{kind}__" in key:
            module = key.split("._addons.")[0]
            counts[module] = counts.get(module, 0) + 1
    return counts


def check_script(command, repo):
    """Outputs of one checkpoint script: the file it writes, with the experts it should hold."""
    out = next((binding(command, f"{fn}.out_path") for fn in ("put_index_to_lora", "run_concatenate",
                "average_outer_product_lora_weights", "create_router_embeddings_from_weights")
                if f"@{fn}" in command or f"{fn}.out_path" in command), None)
    if "use_input_gate_as_router.path" in command:
        out = binding(command, "use_input_gate_as_router.path")
    if out is None:
        return
    state = read_checkpoint(str(repo / "exp_out" / out / "best.pt"))
    assert experts(state), f"{out}: no experts"
    if "run_concatenate.out_path" in command:
        names = json.loads(re.search(r"run_concatenate\.datasets=(\[[^\]]*\])", command).group(1))
        suffix = binding(command, "run_concatenate.suffix")
        assert set(experts(state).values()) == {len(names)}, out
        assert set(experts(state, "router.expert_embeddings").values()) == {len(names)}, out
        assert not any("input_gate" in k for k in state), out
        if "inpgate" not in suffix:  # Average Activation: every expert's router vectors are its mean hiddens
            for i in range(len(names)):
                vectors = [v for k, v in state.items() if k.endswith(f".router.expert_embeddings__{i}")]
                assert all(v.abs().sum() > 0 for v in vectors), (out, i)
        else:  # PHATGOOSE: each expert's router vectors are its trained gates, in order
            for i, name in enumerate(names):
                gate = read_checkpoint(str(repo / "exp_out/datasets_concatenated" / f"{name}_{suffix}" / "best.pt"))
                gates = {k: v for k, v in gate.items() if k.endswith("expert_lora.expert_input_gate")}
                assert gates, name
                for key, vector in gates.items():
                    router = key.replace("expert_lora.expert_input_gate", f"router.expert_embeddings__{i}")
                    assert torch.equal(state[router], vector), (name, key)
    if "average_outer_product_lora_weights.out_path" in command:  # one expert of rank N*r
        source = read_checkpoint(str(repo / "exp_out" / binding(command, "average_outer_product_lora_weights.path")
                                     / "best.pt"))
        module, n = next(iter(experts(source).items()))
        rank = source[f"{module}._addons.expert_lora.layer1__0"].shape[1]
        assert state[f"{module}._addons.expert_lora.layer1__0"].shape[1] == n * rank, out


def replay(block, repo):
    started = time.monotonic()
    done = new_shell(block, repo)
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"README block failed:\n{block}\n--- stderr ---\n{done.stderr[-4000:]}"
    # Output is not a terminal here: no progress bar may write carriage-return frames into it.
    assert "\r" not in done.stdout and "\r" not in done.stderr, "progress-bar frames in a log"
    if re.search(rf"{LAUNCHERS}train\w*\.sh", block):
        # The training launchers ask for wandb; a new user's shell has no login and no WANDB_MODE, so every
        # run says, among its first lines, that it logs nothing remotely, and runs on.
        assert "[colm] logging: none: no wandb login" in done.stdout, done.stdout[:2000]
    for command in commands(block):
        if LAUNCHERS in command:
            check_launcher(command, repo)
        elif command.startswith("python scripts/"):
            check_script(command, repo)
    for path in re.findall(r"python scripts/show_results.py (\S+)", block):
        assert "average_score" in done.stdout, path
    print(f"[readme] {seconds:.0f} s: {block.splitlines()[0][:100]}")
    return done


def own_tasks_block(block):
    """The "Your own tasks and experts" block stands alone; the others build on each other in README order."""
    return "-extra_gin_files" in block


@pytest.mark.slow
@pytest.mark.parametrize("part", ["toy world", "own tasks"])
def test_every_embedded_default_block_runs_word_for_word_in_a_new_shell(user_repo, part):
    blocks = [b for b in embedded_blocks() if own_tasks_block(b) == (part == "own tasks")]
    # stage 1 on the toy world, the entry point, the PHATGOOSE sequence, the baselines; or the own-tasks block
    assert len(blocks) >= (4 if part == "toy world" else 1), [b.splitlines()[0] for b in blocks]
    for block in blocks:  # in README order: the baselines block reuses the PHATGOOSE block's experts
        replay(block, user_repo)
    direct = [c for b in blocks for c in commands(b) if "python -m colm.main" in c]
    for command in direct:
        exp = re.match(r"EXP_NAME=(\S+)", command).group(1)
        scopes = set(re.findall(r"D/[A-Z0-9_]+/EVAL", command))
        assert (user_repo / "exp_out" / exp / "best.pt").is_file() and scopes <= set(last_results(user_repo, exp))
