"""Every expert of a setting, trained and gated as independent jobs (scripts/train_experts.py).

One expert is the README's four commands ("PHATGOOSE, step by step"), built here and nowhere else (the
quickstart uses the same functions):

    train_single_task_loralinear.sh -exp_name <lora> -dataset <SCOPE>        a LoRA expert   (lora_commands)
    manipulations.py put_index_to_lora <lora> -> <moe>                       the MoE format
    train_gate.sh -exp_name <gated> -dataset <SCOPE> -old_exp_name <moe>     its gate        (gate_commands)
    manipulations.py use_input_gate_as_router <gated>                        the gate becomes the router vector

with <lora> = <name>_<suffix>, <moe> = datasets_concatenated/<name>_<suffix> and
<gated> = datasets_concatenated/<name>_<suffix>_inpgatetrainnogumbel (suffix default "<model_type>_lora"), so
that `scripts/concatenate.py` finds the gated experts by name as the README shows.

`ExpertJobs` makes each expert one stage of colm/procedures/stages.py (marker, log, retries under
exp_out/<root>/) and runs them in a local pool (`run_pool`), or writes a SLURM job-array script running the
same commands with the same markers (`slurm_script`); `rows` and `table` gather the results.
"""

import contextlib
import os
import re
import shlex
import time
from collections import OrderedDict
from dataclasses import dataclass

from colm.datasets.settings import all_settings
from colm.formats.layout import CONCATENATED_DIR, EXP_OUT, expert_path
from colm.procedures.stages import (
    DONE,
    FAILED,
    LOG_DIR,
    MARKER_DIR,
    NOT_RUN,
    SKIPPED,
    Stage,
    StageRunner,
    read_marker,
    slug,
)
from colm.utils.run_dir import read_status

SCRIPTS = "colm/experiments/bash_scripts"
GATED_SUFFIX = "inpgatetrainnogumbel"  # the README's name for a gated expert: <name>_<suffix>_inpgatetrainnogumbel


# ----- one expert's commands -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExpertPaths:
    """Experiment paths (relative to exp_out/) of one expert's three checkpoints."""
    lora: str  # the plain LoRA run (train_single_task_loralinear.sh)
    moe: str  # its MoE-format copy (put_index_to_lora), which gate training starts from
    gated: str  # the gate run (train_gate.sh); use_input_gate_as_router rewrites its best.pt


def expert_paths(name: str, suffix: str, lora_dir: str = "", expert_dir: str = CONCATENATED_DIR) -> ExpertPaths:
    """The README's layout by default: <name>_<suffix>, datasets_concatenated/<name>_<suffix>{,_inpgatetrainnogumbel}."""
    lora = f"{lora_dir}/{name}_{suffix}" if lora_dir else f"{name}_{suffix}"
    return ExpertPaths(lora, expert_path(name, suffix, expert_dir), expert_path(name, f"{suffix}_{GATED_SUFFIX}", expert_dir))


def manipulation_command(func: str, **kwargs) -> list:
    """`python scripts/manipulations.py --gin_bindings func_caller.func=@<func> <func>.<k>=<v> ...`; strings are
    quoted for gin, numbers and lists are not."""
    bindings = [f"func_caller.func=@{func}"] + [
        f"{func}.{k}={v}" if isinstance(v, (int, list)) or str(v).startswith("[") else f'{func}.{k}="{v}"'
        for k, v in kwargs.items()]
    return ["python", "scripts/manipulations.py", "--gin_bindings", *bindings]


def _gin_files_flag(extra_gin_files: str) -> list:
    return ["-extra_gin_files", extra_gin_files] if extra_gin_files else []


def lora_commands(scope: str, paths: ExpertPaths, bindings: str, extra_gin_files: str = "") -> list:
    """Steps 1 and 1b: train the LoRA expert on D/<scope>/TRAIN, then put it into the MoE key format."""
    return [
        ["bash", f"{SCRIPTS}/train_single_task_loralinear.sh", "-exp_name", paths.lora, "-dataset", scope,
         *_gin_files_flag(extra_gin_files), "-extra_bindings", bindings],
        manipulation_command("put_index_to_lora", path=paths.lora, out_path=paths.moe),
    ]


def gate_commands(scope: str, paths: ExpertPaths, bindings: str, extra_gin_files: str = "") -> list:
    """Steps 2 and 3: train the expert's gate, then make the gate its router vector."""
    return [
        ["bash", f"{SCRIPTS}/train_gate.sh", "-exp_name", paths.gated, "-dataset", scope, "-old_exp_name", paths.moe,
         *_gin_files_flag(extra_gin_files), "-extra_bindings", bindings],
        manipulation_command("use_input_gate_as_router", path=paths.gated),
    ]


# ----- a setting's experts as jobs --------------------------------------------------------------------------------

@dataclass
class ExpertRow:
    """One line of the results table."""
    index: int
    name: str
    scope: str
    status: str  # stages.SKIPPED, DONE, FAILED, NOT_RUN
    seconds: object  # float, or None when unknown
    expert_score: object  # best validation score of the LoRA run (its run_status.json), or None
    gate_score: object  # the same for the gate run
    log: str


class ExpertJobs:
    """The experts of `setting` (OrderedDict {name: scope}, in index order) as stages under exp_out/<root>/.

    bindings go to both trainings, expert_bindings / gate_bindings after them to one; extra_gin_files: the
    launchers' -extra_gin_files (the user's own task registries)."""

    def __init__(self, setting, root="train_experts", suffix="t5xl_lora", model_type="t5xl", bindings="",
                 expert_bindings="", gate_bindings="", extra_gin_files="", label="experts"):
        self.setting = OrderedDict(setting)
        self.root = root
        self.out = os.path.join(EXP_OUT, root)
        self.suffix = suffix
        self.model_type = model_type
        self.expert_bindings = " ".join(b for b in (bindings, expert_bindings) if b)
        self.gate_bindings = " ".join(b for b in (bindings, gate_bindings) if b)
        self.extra_gin_files = extra_gin_files
        self.label = label  # names the table file and the SLURM job

    def paths(self, name: str) -> ExpertPaths:
        return expert_paths(name, self.suffix)

    def commands(self, name: str, scope: str) -> list:
        paths = self.paths(name)
        return (lora_commands(scope, paths, self.expert_bindings, self.extra_gin_files)
                + gate_commands(scope, paths, self.gate_bindings, self.extra_gin_files))

    def stage(self, name: str) -> Stage:
        return Stage(f"expert {name}_{self.suffix}", self.commands(name, self.setting[name]))

    def runner(self, retries: int = 0, env=None) -> StageRunner:
        return StageRunner(self.out, retries=retries, env=env)

    # ----- the local pool -------------------------------------------------------------------------------------
    def run_pool(self, workers: int = 2, retries: int = 0, devices=None, env=None, echo=None) -> list:
        """Runs every expert not done before, `workers` at a time (or one per entry of devices, each job seeing
        that one GPU through CUDA_VISIBLE_DEVICES); a failed expert is retried, then reported, and the others
        go on. Writes and returns the table rows."""
        env = dict(os.environ if env is None else env)
        envs = [dict(env, CUDA_VISIBLE_DEVICES=str(d)) for d in devices] if devices else None
        echo = echo or (lambda line: print(line, flush=True))  # one line per expert, at once even into a file
        runner = self.runner(retries, env)
        names = list(self.setting)
        total, started, finished = len(names), time.time(), []

        def on_result(result):
            finished.append(result)
            where = f"; log {result.log}" if result.status == FAILED else ""
            seconds = f" in {result.seconds:.0f}s" if result.status != SKIPPED else ""
            echo(f"[train_experts] {result.name}: {result.status}{seconds}{where} "
                 f"({len(finished)}/{total} experts, {time.time() - started:.0f}s in all)")

        stages = [self.stage(name) for name in names]
        # Nothing left to run: no preloaded Python (it takes seconds to start) for a re-run that only skips.
        pending = not all(runner.is_done(stage) for stage in stages)
        with runner.preloaded() if pending else contextlib.nullcontext():
            results = runner.run_chains([[stage] for stage in stages], workers, on_result, envs)
        return self.rows({name: result for name, result in zip(names, results)})

    # ----- gathering the results ------------------------------------------------------------------------------
    def rows(self, results=None) -> list:
        """A row per expert: this run's result where given ({name: StageResult}), else what the markers say
        (done before, failed, or not run)."""
        runner = self.runner()
        rows = []
        for index, (name, scope) in enumerate(self.setting.items()):
            stage = Stage(f"expert {name}_{self.suffix}")
            result = (results or {}).get(name)
            marker = read_marker(runner.marker(stage))
            failure = read_marker(runner.failure_file(stage))
            if result is not None and result.status != SKIPPED:
                status, seconds = result.status, result.seconds
            elif marker is not None:
                status, seconds = SKIPPED, marker.get("seconds")
            else:
                status, seconds = (FAILED if failure is not None else NOT_RUN), None
            paths = self.paths(name)
            rows.append(ExpertRow(index, name, scope, status, seconds, _best_score(paths.lora), _best_score(paths.gated),
                                  runner.log(stage)))
        return rows

    def log_dir(self) -> str:
        return os.path.join(self.out, LOG_DIR)

    def table_file(self) -> str:
        # the suffix too: a table of the tiny experts and one of the t5xl experts of the same names are two tables
        return os.path.join(self.out, f"{slug(self.label)}_{slug(self.suffix)}.md")

    def table(self, rows) -> str:
        """The markdown table of the rows, also written to exp_out/<root>/<label>_<suffix>.md."""
        counts = {status: sum(r.status == status for r in rows) for status in (DONE, SKIPPED, FAILED, NOT_RUN)}
        lines = [f"# Experts of {self.label}: trained and gated", "",
                 f"{len(rows)} experts under exp_out/{CONCATENATED_DIR}/<name>_{self.suffix}_{GATED_SUFFIX}: "
                 + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
                 + ". Scores: best validation score of the expert's LoRA run and of its gate run (run_status.json). "
                 f"Markers in exp_out/{self.root}/{MARKER_DIR}/, logs in exp_out/{self.root}/{LOG_DIR}/.", "",
                 "| # | expert | scope | status | time (s) | expert score | gate score | log |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.index} | {r.name} | {r.scope} | {r.status} | {_fmt(r.seconds, '.0f')} | "
                         f"{_fmt(r.expert_score, '.4f')} | {_fmt(r.gate_score, '.4f')} | {r.log} |")
        text = "\n".join(lines) + "\n"
        os.makedirs(self.out, exist_ok=True)
        with open(self.table_file(), "w") as f:
            f.write(text)
        return text

    def concatenate_command(self) -> str:
        """The README's next step over these experts, for the user to run once every expert has its gate."""
        names = "[" + ", ".join(f'"{n}"' for n in self.setting) + "]"
        datasets = f'"{self.label}"' if self.label in all_settings() else names
        return shlex.join(["python", "scripts/concatenate.py", "--gin_bindings", f"run_concatenate.datasets={datasets}",
                           f'run_concatenate.suffix="{self.suffix}_{GATED_SUFFIX}"',
                           f'run_concatenate.out_path="{slug(self.label)}A2{GATED_SUFFIX}_{self.suffix}_concatenated"'])

    # ----- SLURM ----------------------------------------------------------------------------------------------
    def slurm_script(self, repo_root: str, retries: int = 0, sbatch=None, throttle=None) -> str:
        """A SLURM job-array script: task i trains and gates expert i of the setting (the commands of
        `commands`), with the pool's markers and logs, so a re-submission skips finished experts and a run can
        start in one and end in the other. sbatch: {option: value} added to or replacing the defaults;
        throttle: at most that many tasks at once (--array=0-(N-1)%throttle)."""
        names = list(self.setting)
        options = {"job-name": f"colm_{slug(self.label)}",
                   "array": f"0-{len(names) - 1}" + (f"%{throttle}" if throttle else ""),
                   "output": os.path.join(repo_root, self.log_dir(), "slurm_%A_%a.out"),
                   "nodes": "1", "ntasks": "1", "gres": "gpu:1", "cpus-per-task": "8", "time": "24:00:00"}
        options.update(sbatch or {})
        placeholders = ("COLMEXPERTNAME", "COLMEXPERTSCOPE")
        steps = self.commands(*placeholders)
        slugs = [slug(self.stage(name).name) for name in names]
        lines = ["#!/bin/bash", f"# Generated by scripts/train_experts.py: the {len(names)} experts of {self.label}, "
                 "trained and gated; array task i = expert i of the setting's order.",
                 "#   sbatch THIS_FILE                      submit (again: finished experts are skipped)",
                 "#   COLM_DRY_RUN=1 SLURM_ARRAY_TASK_ID=i bash THIS_FILE   print the commands of task i",
                 *[f"#SBATCH --{key}={value}" for key, value in options.items() if value],  # OPTION= drops one
                 "set -euo pipefail",
                 f"cd {shlex.quote(repo_root)}",
                 "source exp_launch/setup_environment_variable.sh",
                 f"export MODEL_TYPE={shlex.quote(self.model_type)}",
                 f"RETRIES={int(retries)}",
                 f"STAGES={shlex.quote(os.path.join(self.out, MARKER_DIR))}",
                 f"LOGS={shlex.quote(self.log_dir())}",
                 _bash_array("NAMES", names),
                 _bash_array("SCOPES", list(self.setting.values())),
                 _bash_array("SLUGS", slugs),
                 'i="${SLURM_ARRAY_TASK_ID:?run under sbatch --array, or set SLURM_ARRAY_TASK_ID}"',
                 f'if ! [[ "$i" =~ ^[0-9]+$ ]] || (( i >= {len(names)} )); then',
                 f'  echo "[train_experts] SLURM_ARRAY_TASK_ID=$i: this script has array tasks 0-{len(names) - 1}" >&2',
                 "  exit 2",
                 "fi",
                 'name="${NAMES[$i]}" scope="${SCOPES[$i]}" marker="$STAGES/${SLUGS[$i]}" log="$LOGS/${SLUGS[$i]}.log"',
                 "",
                 "# step K COMMAND...: runs command K of the expert unless its step marker exists; tried 1+RETRIES times.",
                 "step() {",
                 "  local k=$1 attempt",
                 "  shift",
                 "  if [ -n \"${COLM_DRY_RUN:-}\" ]; then printf '%q ' \"$@\"; echo; return 0; fi",
                 "  if [ -e \"$marker.step$k\" ]; then echo \"\\$ $* (finished before, skipped)\"; return 0; fi",
                 "  for attempt in $(seq 1 $((RETRIES + 1))); do",
                 "    echo \"\\$ $*\"",
                 "    if \"$@\"; then touch \"$marker.step$k\"; return 0; fi",
                 "    echo \"[train_experts] $name: command $k failed (attempt $attempt of $((RETRIES + 1)))\"",
                 "  done",
                 "  printf '{\"log\": \"%s\", \"attempts\": %s}\\n' \"$log\" \"$((RETRIES + 1))\" > \"$marker.failed\"",
                 "  echo \"[train_experts] $name: failed; log $log\" >&3",
                 "  exit 1",
                 "}",
                 "",
                 "if [ -e \"$marker\" ]; then echo \"[train_experts] $name: done before, skipped\"; exit 0; fi",
                 "if [ -z \"${COLM_DRY_RUN:-}\" ]; then",
                 "  mkdir -p \"$STAGES\" \"$LOGS\"",
                 "  echo \"[train_experts] task $i: expert $name (D/$scope/TRAIN); log $log\"",
                 "  exec 3>&1 >> \"$log\" 2>&1  # the expert's log; fd 3 stays SLURM's output file",
                 "fi"]
        for k, command in enumerate(steps):
            lines.append(f"step {k} " + " ".join(_bash_word(word, placeholders) for word in command))
        lines += ["if [ -z \"${COLM_DRY_RUN:-}\" ]; then",
                  "  printf '{\"seconds\": %s, \"finished\": \"%s\"}\\n' \"$SECONDS\" \"$(date '+%Y-%m-%d %H:%M:%S')\""
                  " > \"$marker\"",
                  "  rm -f \"$marker\".step* \"$marker.failed\"",
                  "  echo \"[train_experts] $name: done in ${SECONDS}s\" >&3",
                  "fi", ""]
        return "\n".join(lines)


def _bash_array(variable: str, values: list) -> str:
    """NAMES=(\n  a b c ...\n): eight values a line."""
    quoted = [shlex.quote(v) for v in values]
    chunks = [" ".join(quoted[i:i + 8]) for i in range(0, len(quoted), 8)]
    return f"{variable}=(\n" + "\n".join(f"  {chunk}" for chunk in chunks) + "\n)"


def _bash_word(word: str, placeholders: tuple) -> str:
    """A command word for bash, with the placeholders of the expert's name and scope becoming "$name" and
    "$scope": `"$name"_t5xl_lora`, `'put_index_to_lora.path="'"$name"'_t5xl_lora"'`."""
    variables = {placeholders[0]: '"$name"', placeholders[1]: '"$scope"'}
    parts = re.split("(" + "|".join(placeholders) + ")", word)
    return "".join(variables.get(part) or shlex.quote(part) for part in parts if part) or "''"


def _best_score(exp_path: str):
    status = read_status(os.path.join(EXP_OUT, exp_path))
    return None if status is None else status.get("best_score")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)

