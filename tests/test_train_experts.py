"""Every expert of a setting as independent jobs (scripts/train_experts.py, colm/procedures/expert_jobs.py) and the
marker-based stage runner under it and the quickstart (colm/procedures/stages.py)."""

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, subprocess_env

from colm.datasets.settings import get_setting
from colm.procedures.expert_jobs import ExpertJobs, expert_paths, gate_commands, lora_commands
from colm.procedures.stages import DONE, FAILED, NOT_RUN, SKIPPED, Stage, StageRunner


def load_cli():
    spec = importlib.util.spec_from_file_location("train_experts_cli", os.path.join(REPO_ROOT, "scripts/train_experts.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python(code):
    return ["python", "-c", code]


def append(path, text):
    """A command appending text to a file: how the runner tests count what ran."""
    return python(f"open({str(path)!r}, 'a').write({text!r})")


# ----- the stage runner -------------------------------------------------------------------------------------------

def test_runner_skips_a_finished_stage(tmp_path):
    runner = StageRunner(str(tmp_path / "out"))
    stage = Stage("expert A", [append(tmp_path / "ran", "a")])
    first = runner.run(stage)
    again = runner.run(stage)
    assert (first.status, again.status) == (DONE, SKIPPED)
    assert (tmp_path / "ran").read_text() == "a"
    assert json.loads(open(runner.marker(stage)).read())["seconds"] >= 0
    assert not os.path.exists(runner.step_marker(stage, 0))  # step markers go once the stage is done


def test_a_retry_goes_on_after_the_commands_that_finished(tmp_path):
    flag = tmp_path / "failed_once"
    flaky = python(f"import os, sys; p = {str(flag)!r}; done = os.path.exists(p); open(p, 'a').close(); "
                   "sys.exit(0 if done else 3)")
    stage = Stage("expert B", [append(tmp_path / "ran", "1"), flaky, append(tmp_path / "ran", "3")])
    result = StageRunner(str(tmp_path / "out"), retries=1).run(stage)
    assert (result.status, result.attempts) == (DONE, 2)
    assert (tmp_path / "ran").read_text() == "13"  # the first command ran once
    log = open(result.log).read()
    assert "exit status 3" in log and "attempt 2 of 2" in log and "(finished before, skipped)" in log


def test_a_failed_chain_is_reported_and_the_others_go_on(tmp_path):
    runner = StageRunner(str(tmp_path / "out"), retries=1)
    chains = [[Stage("good", [append(tmp_path / "good", "x")])],
              [Stage("bad", [python("import sys; print('broken on purpose'); sys.exit(1)")]), Stage("after bad", [])],
              [Stage("good too", [append(tmp_path / "good", "y")])]]
    seen = []
    results = runner.run_chains(chains, workers=2, on_result=lambda r: seen.append(r.name))
    assert [(r.name, r.status) for r in results] == [("good", DONE), ("bad", FAILED), ("after bad", NOT_RUN),
                                                     ("good too", DONE)]
    assert sorted(seen) == sorted(r.name for r in results)
    bad = results[1]
    assert bad.attempts == 2 and "broken on purpose" in bad.tail
    assert json.load(open(runner.failure_file(chains[1][0])))["log"] == bad.log
    assert sorted((tmp_path / "good").read_text()) == ["x", "y"]


# ----- one expert's commands --------------------------------------------------------------------------------------

def test_expert_commands_are_the_readme_sequence():
    paths = expert_paths("P3Socialiqa", "t5xl_lora")
    assert paths.lora == "P3Socialiqa_t5xl_lora"
    assert paths.moe == "datasets_concatenated/P3Socialiqa_t5xl_lora"
    assert paths.gated == "datasets_concatenated/P3Socialiqa_t5xl_lora_inpgatetrainnogumbel"
    commands = lora_commands("P3SOCIALIQA", paths, "B") + gate_commands("P3SOCIALIQA", paths, "G", "mine.gin")
    assert [c[1] for c in commands] == ["colm/experiments/bash_scripts/train_single_task_loralinear.sh",
                                        "scripts/manipulations.py", "colm/experiments/bash_scripts/train_gate.sh",
                                        "scripts/manipulations.py"]
    assert commands[1][3:] == ['func_caller.func=@put_index_to_lora', 'put_index_to_lora.path="P3Socialiqa_t5xl_lora"',
                               'put_index_to_lora.out_path="datasets_concatenated/P3Socialiqa_t5xl_lora"']
    assert commands[2][-4:] == ["-extra_gin_files", "mine.gin", "-extra_bindings", "G"]
    assert "-extra_gin_files" not in commands[0]


def test_setting_arguments_and_own_task_names():
    cli = load_cli()
    assert cli.parse_setting(["Full"]) == ("Full", "Full")
    assert cli.parse_setting(["A", "B:MYB"]) == (["A", "B:MYB"], "experts_A_B")
    assert cli.parse_setting(['["MyEcho", "MySentiment"]']) == (["MyEcho", "MySentiment"], "experts_MyEcho_MySentiment")
    assert cli.parse_setting(["ToyInstrument"]) == (["ToyInstrument"], "experts_ToyInstrument")  # one name, not a setting
    # Longer lists: a label of their own each, so two lists never share a table file.
    five, other = [f"E{i}" for i in range(5)], [f"E{i}" for i in (0, 1, 2, 3, 5)]
    assert cli.parse_setting(five)[1].startswith("experts_E0_and_4_more_")
    assert cli.parse_setting(five)[1] != cli.parse_setting(other)[1]
    assert dict(get_setting(["MyEcho", "Mine:REVIEWS"], check_scopes=False)) == {"MyEcho": "MYECHO", "Mine": "REVIEWS"}
    with pytest.raises(ValueError, match="OPTION=VALUE"):
        cli.parse_sbatch(["partition"])


# ----- SLURM ------------------------------------------------------------------------------------------------------

def dry_run(script, task, cwd):
    env = dict(subprocess_env(cwd), COLM_DRY_RUN="1", SLURM_ARRAY_TASK_ID=str(task))
    done = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines()]


def test_slurm_script_for_full_is_one_array_task_per_expert(in_tmp_repo):
    script = in_tmp_repo / "train_Full.sh"
    assert load_cli().main(["--setting", "Full", "--model_type", "t5xl", "--slurm", str(script), "--retries", "1",
                            "--extra_bindings", "P/TRAIN/Trainer.gradient_accumulation_factor=32",
                            "--gate_bindings", "main.logging_backend=None", "--sbatch", "partition=gpu",
                            "--sbatch", "gres="]) == 0
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "#SBATCH --array=0-165\n" in text and "#SBATCH --partition=gpu\n" in text and "--gres" not in text
    assert re.search(r"#SBATCH --output=(\S+)/slurm_%A_%a.out", text).group(1) == str(in_tmp_repo / "exp_out/train_experts/logs")
    assert (in_tmp_repo / "exp_out/train_experts/logs").is_dir()  # SLURM does not create it
    setting = get_setting("Full")
    jobs = ExpertJobs(setting, bindings="P/TRAIN/Trainer.gradient_accumulation_factor=32",
                      gate_bindings="main.logging_backend=None")
    names = list(setting)
    for task in (0, 40, 165):
        name = names[task]
        assert dry_run(script, task, in_tmp_repo) == jobs.commands(name, setting[name])
    beyond = subprocess.run(["bash", str(script)], cwd=in_tmp_repo, capture_output=True, text=True,
                            env=dict(subprocess_env(in_tmp_repo), COLM_DRY_RUN="1", SLURM_ARRAY_TASK_ID="166"))
    assert beyond.returncode == 2 and "SLURM_ARRAY_TASK_ID=166: this script has array tasks 0-165" in beyond.stderr


STUB = """#!/bin/bash
# stands in for bash and python: records its arguments; fails for the expert named in $FAIL_FOR
echo "$*" >> "$CALLS"
case "$*" in *"$FAIL_FOR"*) exit 1 ;; esac
exit 0
"""


def test_slurm_tasks_keep_markers_and_report_failures(in_tmp_repo):
    """The array tasks run for real with stub launchers: markers, retries, skips and the gathered table."""
    cli = load_cli()
    script = in_tmp_repo / "train_toy.sh"
    toy = ["--setting", "ToySentiment", "ToyTopic", "--model_type", "t5xl"]
    assert cli.main(toy + ["--slurm", str(script), "--retries", "1"]) == 0
    stubs = in_tmp_repo / "stubs"
    stubs.mkdir()
    for name in ("bash", "python"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    calls = in_tmp_repo / "calls.txt"

    def task(i):
        env = dict(subprocess_env(in_tmp_repo), SLURM_ARRAY_TASK_ID=str(i), CALLS=str(calls), FAIL_FOR="ToyTopic")
        env["PATH"] = f"{stubs}:{env['PATH']}"
        return subprocess.run(["/bin/bash", str(script)], cwd=in_tmp_repo, env=env, capture_output=True, text=True)

    assert task(0).returncode == 0
    assert len(calls.read_text().splitlines()) == 4
    assert task(0).returncode == 0  # re-submitted: skipped
    assert len(calls.read_text().splitlines()) == 4
    failed = task(1)
    assert failed.returncode == 1 and "ToyTopic: failed" in failed.stdout  # in SLURM's output file, beside the log
    assert len(calls.read_text().splitlines()) == 6  # its first command, tried twice

    jobs = ExpertJobs(get_setting(["ToySentiment", "ToyTopic"]), suffix="t5xl_lora")
    rows = jobs.rows()
    assert [(r.name, r.status) for r in rows] == [("ToySentiment", SKIPPED), ("ToyTopic", FAILED)]
    assert rows[0].seconds is not None
    assert "attempt 2 of 2" in open(rows[1].log).read()
    assert cli.main(toy + ["--report"]) == 1


# ----- the pool, for real on the toy world ------------------------------------------------------------------------

TOY = ["ToySentiment", "ToyTopic", "ToyReverse"]
TINY = " ".join(["main.logging_backend=None", "D/ToyDataset.num_examples=40", "P/TRAIN/Trainer.num_steps=3",
                 "P/TRAIN/Trainer.gradient_accumulation_factor=1", "P/TRAIN/Trainer.validation_step_interval=3"]
                + [f"D/{scope}/EVAL/ToyDataset.num_examples=8" for scope in get_setting(TOY).values()])


def train_experts(cwd, *flags):
    done = subprocess.run([sys.executable, "scripts/train_experts.py", "--setting", *TOY, "--workers", "2", *flags],
                          cwd=cwd, env=subprocess_env(cwd), capture_output=True, text=True)
    return done.returncode, done.stdout, done.stderr


def outputs(cwd):
    """{file: mtime} of every checkpoint and result the experts' runs wrote."""
    found, own = {}, str(cwd / "exp_out/train_experts")
    for directory, _, files in os.walk(cwd / "exp_out"):
        for name in files:
            if not directory.startswith(own):
                path = os.path.join(directory, name)
                found[path] = os.stat(path).st_mtime_ns
    return found


@pytest.mark.slow
def test_pool_trains_and_gates_toy_experts_with_two_workers_and_a_rerun_does_nothing(in_tmp_repo):
    # A bad binding for one expert's dataset: it fails twice (--retries 1) while the others are trained and gated.
    bad = 'D/TOYTOPIC/TRAIN/ToyDataset.task="no_such_task"'
    code, out, err = train_experts(in_tmp_repo, "--retries", "1", "--extra_bindings", f"{TINY} {bad}")
    assert code == 1, out + err
    assert "FAILED: ToyTopic" in err and "exp_out/train_experts/logs/expert_ToyTopic_tiny_lora.log" in err
    topic_log = (in_tmp_repo / "exp_out/train_experts/logs/expert_ToyTopic_tiny_lora.log").read_text()
    assert "no_such_task" in topic_log and "attempt 2 of 2" in topic_log
    table = (in_tmp_repo / "exp_out/train_experts/experts_ToySentiment_ToyTopic_ToyReverse_tiny_lora.md").read_text()
    assert re.search(r"\| 1 \| ToyTopic \| TOYTOPIC \| failed \|", table)
    for name in ("ToySentiment", "ToyReverse"):
        assert re.search(rf"\| {name} \| \w+ \| done \| \d+ \| 0\.\d+ \| 0\.\d+ \|", table), table
        assert (in_tmp_repo / f"exp_out/datasets_concatenated/{name}_tiny_lora_inpgatetrainnogumbel/best.pt").is_file()

    # Fixed and run again: only the failed expert runs.
    before = outputs(in_tmp_repo)
    code, out, err = train_experts(in_tmp_repo, "--extra_bindings", TINY)
    assert code == 0, out + err
    after = outputs(in_tmp_repo)
    assert {p: t for p, t in after.items() if p in before and "ToyTopic" not in p} == \
        {p: t for p, t in before.items() if "ToyTopic" not in p}
    assert (in_tmp_repo / "exp_out/datasets_concatenated/ToyTopic_tiny_lora_inpgatetrainnogumbel/best.pt").is_file()
    assert "run_concatenate.suffix=\"tiny_lora_inpgatetrainnogumbel\"" in out

    # Everything done: a re-run does nothing (no launcher runs: no file changes, no log is rewritten).
    logs = {p.name: p.stat().st_mtime_ns for p in (in_tmp_repo / "exp_out/train_experts/logs").iterdir()}
    code, out, err = train_experts(in_tmp_repo, "--extra_bindings", TINY)
    assert code == 0, out + err
    assert out.count(": done before (") == 3
    assert outputs(in_tmp_repo) == after
    assert {p.name: p.stat().st_mtime_ns for p in (in_tmp_repo / "exp_out/train_experts/logs").iterdir()} == logs
    assert len(re.findall(r"\| done before \|", (in_tmp_repo / "exp_out/train_experts/experts_ToySentiment_ToyTopic_ToyReverse_tiny_lora.md").read_text())) == 3
