"""Running a pipeline as stages of commands, with a marker per finished stage (the quickstart, train_experts).

A stage is a name and a list of commands (each a list of argv words; a first word "python" runs with this
interpreter). `StageRunner(out_dir)` runs stages as child processes and keeps its bookkeeping under out_dir:

    <out_dir>/.stages/<slug>          the stage finished: JSON {"seconds", "finished"}; a re-run skips the stage
    <out_dir>/.stages/<slug>.step<i>  command i of an unfinished stage finished; a retry or re-run goes on after it
    <out_dir>/.stages/<slug>.failed   the stage failed on its last attempt: JSON {"log", "attempts"}
    <out_dir>/logs/<slug>.log         every command line of the stage and its output, attempt after attempt

A failed stage is tried again up to `retries` times (from its first unfinished command); it is then reported
as failed, and `run_chains` goes on with every other chain. Nothing here reads what the commands write.

Inside `with runner.preloaded():` the commands run through a preloaded Python (colm/utils/preloaded.py): each
is still a process of its own with the same results, but does not import torch and transformers again.
"""

import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

from colm.utils import preloaded

MARKER_DIR = ".stages"
LOG_DIR = "logs"

# Statuses of a StageResult.
SKIPPED, DONE, FAILED, NOT_RUN = "done before", "done", "failed", "not run"


@dataclass
class Stage:
    name: str
    commands: list = field(default_factory=list)  # each a list of argv words


@dataclass
class StageResult:
    name: str
    status: str  # SKIPPED, DONE, FAILED or NOT_RUN (an earlier stage of its chain failed)
    seconds: float = 0.0
    log: str = ""
    attempts: int = 0
    tail: str = ""  # the last lines of the log of a failed stage


def slug(name: str) -> str:
    """"expert ToySentiment" -> "expert_ToySentiment": a stage's name as a file name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def marker_text(seconds: float) -> str:
    """What a finished stage's marker holds (the SLURM script of colm/procedures/expert_jobs.py writes the same)."""
    return json.dumps({"seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})


def read_marker(path: str):
    """The marker's dict, {} for a marker without one (older runs wrote empty files), None without a marker."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def tail(path: str, lines: int = 30) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


class StageRunner:
    """Runs stages with markers under out_dir; `retries` further attempts for a failed stage; `env` the
    environment of every command (default: this process's)."""

    def __init__(self, out_dir: str, retries: int = 0, env=None):
        self.out_dir = out_dir
        self.retries = retries
        self.env = env
        self.server_path = None  # the preloaded Python's socket, inside `with self.preloaded():`
        self.stopping = threading.Event()  # set by run_chains on Ctrl-C: no stage or retry starts any more

    def marker(self, stage: Stage) -> str:
        return os.path.join(self.out_dir, MARKER_DIR, slug(stage.name))

    def step_marker(self, stage: Stage, index: int) -> str:
        return f"{self.marker(stage)}.step{index}"

    def failure_file(self, stage: Stage) -> str:
        return f"{self.marker(stage)}.failed"

    def log(self, stage: Stage) -> str:
        return os.path.join(self.out_dir, LOG_DIR, slug(stage.name) + ".log")

    def is_done(self, stage: Stage) -> bool:
        return os.path.exists(self.marker(stage))

    def run(self, stage: Stage, env=None) -> StageResult:
        """Runs a stage unless its marker exists; never raises for a failing command (see the result's status).
        env: the environment of this stage's commands (default: the runner's)."""
        log = self.log(stage)
        if self.is_done(stage):
            return StageResult(stage.name, SKIPPED, log=log)
        os.makedirs(os.path.dirname(self.marker(stage)), exist_ok=True)
        os.makedirs(os.path.dirname(log), exist_ok=True)
        started = time.time()
        with open(log, "w") as f:
            for attempt in range(1, self.retries + 2):
                if attempt > 1 and self.stopping.is_set():
                    break
                if attempt > 1:
                    f.write(f"\n----- attempt {attempt} of {self.retries + 1} -----\n")
                    f.flush()
                if self._run_commands(stage, f, env if env is not None else self.env):
                    break
        seconds = time.time() - started
        if not all(os.path.exists(self.step_marker(stage, i)) for i in range(len(stage.commands))):
            with open(self.failure_file(stage), "w") as f:
                json.dump({"log": log, "attempts": attempt}, f)
            return StageResult(stage.name, FAILED, seconds, log, attempt, tail(log))
        with open(self.marker(stage), "w") as f:
            f.write(marker_text(seconds))
        for i in range(len(stage.commands)):
            os.remove(self.step_marker(stage, i))
        if os.path.exists(self.failure_file(stage)):
            os.remove(self.failure_file(stage))
        return StageResult(stage.name, DONE, seconds, log, attempt)

    def _run_commands(self, stage: Stage, log_file, env) -> bool:
        """Runs the stage's commands that have no step marker yet, in order; False at the first that fails."""
        for index, command in enumerate(stage.commands):
            step = self.step_marker(stage, index)
            if os.path.exists(step):
                log_file.write(f"$ {shlex.join(command)}\n(finished before, skipped)\n")
                continue
            log_file.write(f"$ {shlex.join(command)}\n")
            log_file.flush()
            argv, env = self._argv_and_env(command, env)
            code = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode
            if code != 0:
                log_file.write(f"[stages] exit status {code}\n")
                log_file.flush()
                return False
            open(step, "w").close()
        return True

    @contextmanager
    def preloaded(self):
        """Runs the commands started inside the block through one preloaded Python, started with the runner's
        environment (a command whose environment differs in what imports read runs as a plain process)."""
        server = preloaded.Server(env=self.env)
        try:
            self.server_path = server.wait_ready()
            yield self
        finally:
            self.server_path = None
            server.close()

    def _argv_and_env(self, command, env):
        """A "python" command runs with this interpreter, through the preloaded Python when there is one."""
        if command[0] != "python":
            argv = list(command)
        elif self.server_path:
            argv = [sys.executable, "-m", "colm.utils.preloaded", "run", "--"] + list(command[1:])
        else:
            argv = [sys.executable] + list(command[1:])
        if self.server_path:  # the launchers' run_colm and run_python use it too
            env = dict(os.environ if env is None else env, COLM_PRELOADED=self.server_path)
        return argv, env

    def run_chains(self, chains, workers: int = 1, on_result=None, envs=None) -> list:
        """Runs chains of stages, `workers` chains at a time: within a chain one stage after the other, and a
        failed stage leaves the rest of its chain NOT_RUN; other chains go on. on_result(result) is called (from
        a worker thread, one call at a time) as each stage ends. envs: a list of environments, one per worker
        slot (e.g. one GPU each); a chain takes a free one while it runs. Returns every StageResult, chain by
        chain in the given order."""
        slots = queue.Queue()
        for env in envs if envs else [None] * workers:
            slots.put(env)
        report = _Serial(on_result)

        def run_chain(chain):
            env = slots.get()
            try:
                results = []
                for stage in chain:
                    if self.stopping.is_set() or (results and results[-1].status in (FAILED, NOT_RUN)):
                        result = StageResult(stage.name, NOT_RUN, log=self.log(stage))
                    else:
                        result = self.run(stage, env)
                    report(result)
                    results.append(result)
                return results
            finally:
                slots.put(env)

        pool = ThreadPoolExecutor(max_workers=len(envs) if envs else workers)
        try:
            futures = [pool.submit(run_chain, list(chain)) for chain in chains]
            return [result for future in futures for result in future.result()]
        except BaseException:  # Ctrl-C: the running commands get it too; start nothing more
            self.stopping.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)


class _Serial:
    """Calls a callback one call at a time from several threads."""

    def __init__(self, callback):
        self.callback = callback
        self.lock = threading.Lock()

    def __call__(self, result):
        if self.callback is not None:
            with self.lock:
                self.callback(result)
