"""The embedded default, end to end: experts, gates, routing and every baseline on the toy world.

    python -m colm.quickstart            # what `bash exp_launch/quickstart.sh` runs
    python -m colm.quickstart --fast     # a reduced run (fewer steps and examples), used by the tests

Every stage is a command of the framework's own launchers and scripts (the same ones the README shows
for T5-XL), run on the tiny T5 with MODEL_TYPE=tiny. Each finished stage leaves a marker in
exp_out/quickstart/.stages/, so a re-run skips it; each stage's output goes to exp_out/quickstart/logs/.
At the end exp_out/quickstart/results.md holds the method table (held-in average, held-out average, every
task) and the held-in routing accuracy; routing heatmaps are under exp_out/quickstart/<method>/.

Design of the toy world (why it tests routing): every task is "<instruction> <random letters>", so the
instruction is the only cue to the skill. Eight held-in skills get one expert each. The held-out tasks
reuse held-in skills where no expert saw them: longer inputs (the right expert must be picked for inputs
outside its training distribution), unseen phrasings of the instruction (routing must generalise from the
words it learned), and a composition of two skills (two experts would have to be combined).
"""

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from colm.datasets.settings import get_setting
from colm.datasets.toy import HELD_OUT_TASKS, TOY_NAMES, scope_name, task_format, task_of_scope
from colm.formats.layout import EXP_OUT, EXPERTS_FILE, RESULTS_FILE
from colm.procedures.results import read_results
from colm.utils.progress import progress
from colm.utils.reproducible import set_reproducible_cpu_env

ROOT = "quickstart"  # under exp_out/
SCRIPTS = "colm/experiments/bash_scripts"
HELD_IN = list(TOY_NAMES)
HELD_OUT = [scope_name(task) for task in HELD_OUT_TASKS]
SUFFIX = "tiny_lora"
GATE_SUFFIX = "tiny_lora_inpgatetrainnogumbel"
# Each evaluated method and its folder under exp_out/quickstart/ (holding best.pt and results.txt).
METHOD_DIRS = {"PHATGOOSE": "phatgoose", "PHATGOOSE, centred (beyond the paper)": "phatgoose_centred",
               "Average Activation": "experts_all", "Arrow": "arrow", "Retrieval": "retrieval",
               "Merged Experts": "merged", "Multitask": "multitask", "Base model": "base"}
# Token-routed methods whose routing the report diagnoses (scripts/analyze_routing.py).
ROUTED = ("PHATGOOSE", "PHATGOOSE, centred (beyond the paper)", "Average Activation", "Arrow")


@dataclass
class Budget:
    expert_steps: int = 200
    gate_steps: int = 100
    multitask_steps: int = 400
    eval_examples: int = 100
    train_examples: int = 1000
    library_rows: int = 200  # training examples per expert in the retrieval library
    avgact_examples: int = 200  # training examples per expert averaged for Average Activation
    calibration_examples: int = 50  # training examples per held-in task for the centred routing's mean inputs
    held_in: tuple = tuple(HELD_IN)
    held_out: tuple = tuple(HELD_OUT)

    @classmethod
    def fast(cls):
        return cls(expert_steps=30, gate_steps=6, multitask_steps=30, eval_examples=16, train_examples=200, library_rows=50,
                   avgact_examples=24, calibration_examples=8,
                   held_in=("ToySentiment", "ToyReverse"), held_out=("TOYFILMSENTIMENT",))


@dataclass
class Stage:
    name: str
    commands: list = field(default_factory=list)  # each a list of argv words


def _quote_list(items):
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


class Pipeline:
    def __init__(self, budget: Budget, root: str = ROOT):
        self.budget = budget
        self.root = root
        self.held_in = get_setting(list(budget.held_in))  # name -> scope
        self.held_out = list(budget.held_out)
        self.eval_scopes = [f"D/{s}/EVAL" for s in self.held_in.values()] + [f"D/{s}/EVAL" for s in self.held_out]
        self.out = os.path.join(EXP_OUT, root)

    # ----- bindings shared by the stages --------------------------------------------------------
    def data_bindings(self):
        b = self.budget
        return (f"main.logging_backend=None D/ToyDataset.num_examples={b.train_examples} "
                + " ".join(f"D/{scope}/EVAL/ToyDataset.num_examples={b.eval_examples}"
                           for scope in list(self.held_in.values()) + self.held_out))

    def train_bindings(self, steps):
        interval = max(steps // 3, 1)
        # A stage without its marker runs again from the start: a training it had finished is redone (the same
        # seeds give the same weights), so it may overwrite that run.
        return (f"{self.data_bindings()} P/TRAIN/Trainer.gradient_accumulation_factor=1 P/TRAIN/Trainer.overwrite=True "
                f"P/TRAIN/Trainer.num_steps={steps} P/TRAIN/Trainer.validation_step_interval={interval}")

    def eval_bindings(self, processors=True):
        analysis = "[@WriteOutputText(), @RoutingDistribution()]" if processors else "[@WriteOutputText()]"
        return (f"{self.data_bindings()} P/EVALUATE/Evaluator.datasets={_quote_list(self.eval_scopes)} "
                f"P/EVALUATE/Evaluator.analysis_processors={analysis} P/EVALUATE/save_results.overwrite=True")

    def path(self, *parts):
        return "/".join((self.root,) + parts)

    @staticmethod
    def manip(func, **kwargs):
        bindings = [f"func_caller.func=@{func}"] + [
            f"{func}.{k}={v}" if isinstance(v, (int, list)) or str(v).startswith("[") else f'{func}.{k}="{v}"'
            for k, v in kwargs.items()]
        return ["python", "scripts/manipulations.py", "--gin_bindings", *bindings]

    # ----- the stages ---------------------------------------------------------------------------
    def stages(self):
        b = self.budget
        stages = []
        for name, scope in self.held_in.items():
            lora = self.path("experts", f"{name}_{SUFFIX}")
            moe = self.path("moe", f"{name}_{SUFFIX}")
            gated = self.path("moe", f"{name}_{GATE_SUFFIX}")
            stages.append(Stage(f"expert {name}", [
                ["bash", f"{SCRIPTS}/train_single_task_loralinear.sh", "-exp_name", lora, "-dataset", scope,
                 "-extra_bindings", self.train_bindings(b.expert_steps)],
                self.manip("put_index_to_lora", path=lora, out_path=moe),
            ]))
            stages.append(Stage(f"average activation {name}", [
                ["bash", f"{SCRIPTS}/reinit_router_embedding.sh", "-exp_name", moe, "-dataset", scope, "-arch", "A2",
                 "-compute_hiddens", "True", "-hiddens_suffix", "_a2", "-max_examples", str(b.avgact_examples),
                 "-extra_bindings", self.data_bindings()],
            ]))
            stages.append(Stage(f"gate {name}", [
                ["bash", f"{SCRIPTS}/train_gate.sh", "-exp_name", gated, "-dataset", scope, "-old_exp_name", moe,
                 "-extra_bindings", self.train_bindings(b.gate_steps)],
                self.manip("use_input_gate_as_router", path=gated),
            ]))
        names = list(self.held_in)
        concat = ["python", "scripts/concatenate.py", "--gin_bindings", f"run_concatenate.datasets={_quote_list(names)}",
                  f'run_concatenate.expert_dir="{self.path("moe")}"']
        stages.append(Stage("concatenate", [
            concat + [f'run_concatenate.suffix="{GATE_SUFFIX}"', f'run_concatenate.out_path="{self.path("phatgoose")}"'],
            concat + [f'run_concatenate.suffix="{SUFFIX}"', f'run_concatenate.out_path="{self.path("experts_all")}"'],
            self.manip("create_router_embeddings_from_weights", path=self.path("experts_all"),
                       out_path=self.path("arrow"), method_type="top1_eigen_weighted_vector"),
            self.manip("average_outer_product_lora_weights", path=self.path("experts_all"),
                       out_path=self.path("merged")),
            ["python", "scripts/calibrate_routers.py", "--exp_name", self.path("phatgoose"),
             "--out_path", self.path("phatgoose_centred"), "--setting", *names,
             "--num_examples", str(b.calibration_examples), "--gin_bindings", *self.data_bindings().split()],
        ]))
        stages.append(Stage("multitask", [
            ["bash", f"{SCRIPTS}/train_multitask.sh", "-exp_name", self.path("multitask_lora"),
             "-dataset_setting", _quote_list(names), "-extra_bindings", self.train_bindings(b.multitask_steps)],
            self.manip("put_index_to_lora", path=self.path("multitask_lora"), out_path=self.path("multitask")),
        ]))
        retriever = ["bash", f"{SCRIPTS}/retriever.sh", "-dataset_setting", _quote_list(names),
                     "-dataset_length", str(b.library_rows), "-library_dir", self.path("retrieval_library")]
        stages.append(Stage("retrieval library", [
            retriever + ["-make_expert_library", "True", "-extra_bindings", self.data_bindings()]]))
        stages.append(Stage("retrieval checkpoint", [
            retriever + ["-create_checkpoint", "True", "-old_exp_name", self.path("experts_all"),
                         "-exp_name", self.path("retrieval")]]))
        stages += [Stage(f"evaluate {method}", [command]) for method, command in self.evaluations().items()]
        return stages

    def eval_command(self, exp_name, extra="", routed=True, arch=None):
        """arch: eval_multitask.sh -arch (default A2); "single" evaluates a one-expert checkpoint alone."""
        return (["bash", f"{SCRIPTS}/eval_multitask.sh", "-exp_name", exp_name] + (["-arch", arch] if arch else [])
                + ["-extra_bindings", f"{self.eval_bindings(routed)} {extra}".strip()])

    def evaluations(self):
        d = {method: self.path(exp) for method, exp in METHOD_DIRS.items()}
        return {
            "PHATGOOSE": self.eval_command(d["PHATGOOSE"]),
            # the same experts and gates; each router centres its inputs by a mean measured on training examples
            "PHATGOOSE, centred (beyond the paper)": self.eval_command(d["PHATGOOSE, centred (beyond the paper)"]),
            # experts_all: the experts concatenated with their average-activation router vectors.
            "Average Activation": self.eval_command(d["Average Activation"]),
            "Arrow": self.eval_command(d["Arrow"], 'M/MODEL/Router.score_type="arrow"'),
            "Merged Experts": self.eval_command(d["Merged Experts"], routed=False, arch="single"),
            "Multitask": self.eval_command(d["Multitask"], routed=False, arch="single"),
            "Base model": self.eval_command(d["Base model"], "M/MODEL/Model.init_moma_calls=[]", routed=False),
            "Retrieval": ["bash", f"{SCRIPTS}/retriever.sh", "-dataset_setting", _quote_list(list(self.held_in)),
                          "-dataset_length", str(self.budget.library_rows), "-exp_name", d["Retrieval"],
                          "-extra_bindings", self.eval_bindings(processors=False)],
        }

    def oracle_stage(self):
        """Each held-in task evaluated with its own expert alone."""
        commands = []
        for name, scope in self.held_in.items():
            commands.append(["bash", f"{SCRIPTS}/eval_multitask.sh", "-exp_name", self.path("moe", f"{name}_{SUFFIX}"),
                             "-arch", "single", "-extra_bindings", f"{self.data_bindings()} "
                             f"P/EVALUATE/Evaluator.datasets=[\"D/{scope}/EVAL\"] P/EVALUATE/save_results.overwrite=True"])
        return Stage("evaluate Oracle", commands)

    # ----- running ------------------------------------------------------------------------------
    def waves(self):
        """Groups of stage chains; chains in a wave are independent and run in parallel, one after another
        within a chain. Waves run in order."""
        stages = {stage.name: stage for stage in self.stages() + [self.oracle_stage()]}
        per_task = [[stages.pop(f"{step} {n}") for step in ("expert", "average activation", "gate")]
                    for n in self.held_in]
        first = per_task + [[stages.pop("multitask")], [stages.pop("retrieval library")]]
        second = [[stages.pop("concatenate"), stages.pop("retrieval checkpoint")]]
        third = [[stage] for stage in stages.values()]
        return [first, second, third, [[self.diagnosis_stage()]]]

    def diagnosis_stage(self):
        """The routing diagnosis (scripts/analyze_routing.py) of every token-routed method."""
        return Stage("diagnose routing", [
            ["python", "scripts/analyze_routing.py", os.path.join(self.out, METHOD_DIRS[method], "routing_distribution"),
             # every method holds the same experts in the same order; only concatenation wrote their names
             "--experts", os.path.join(self.out, METHOD_DIRS["PHATGOOSE"], EXPERTS_FILE)]
            for method in ROUTED])

    def run_stage(self, stage, bar, lock):
        marker = os.path.join(self.out, ".stages", _slug(stage.name))
        if os.path.exists(marker):
            message = f"[quickstart] {stage.name}: done before, skipped"
        else:
            log = os.path.join(self.out, "logs", _slug(stage.name) + ".log")
            started = time.time()
            with open(log, "w") as f:
                for command in stage.commands:
                    f.write("$ " + shlex.join(command) + "\n")
                    f.flush()
                    argv = [sys.executable if command[0] == "python" else command[0]] + command[1:]
                    if subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                        raise RuntimeError(f"[quickstart] stage '{stage.name}' failed; see {log}:\n" + _tail(log))
            open(marker, "w").close()
            message = f"[quickstart] {stage.name}: {time.time() - started:.0f}s"
        with lock:
            bar.update(1)
            self.finished += 1
            tqdm.write(f"{message} ({self.finished}/{self.total} stages, {time.time() - self.started:.0f}s in all)")

    def run(self, jobs=2):
        os.makedirs(os.path.join(self.out, ".stages"), exist_ok=True)
        os.makedirs(os.path.join(self.out, "logs"), exist_ok=True)
        started = self.started = time.time()
        waves = self.waves()
        self.finished, self.total = 0, sum(len(chain) for wave in waves for chain in wave)
        lock = threading.Lock()
        # On a terminal a bar with the stage count and ETA; in a log, one plain line per finished stage.
        with progress(total=self.total, desc="quickstart", unit="stage",
                      dynamic_ncols=True) as bar:
            for wave in waves:
                with ThreadPoolExecutor(max_workers=jobs) as pool:
                    chains = [pool.submit(lambda c=chain: [self.run_stage(s, bar, lock) for s in c]) for chain in wave]
                    for chain in chains:
                        try:
                            chain.result()
                        except RuntimeError as error:
                            raise SystemExit(str(error)) from None
        table = self.report()
        print(table)
        print(f"[quickstart] total {time.time() - started:.0f}s; written to {self.out}/results.md")

    # ----- the report ---------------------------------------------------------------------------
    def scores(self):
        """{method: {scope: score}} from each method's results.txt (last entry)."""
        out = {}
        for method, exp in METHOD_DIRS.items():
            out[method] = _last_scores(os.path.join(self.out, exp, RESULTS_FILE))
        oracle = {}
        for name in self.held_in:
            oracle.update(_last_scores(os.path.join(self.out, "moe", f"{name}_{SUFFIX}", RESULTS_FILE)))
        out["Oracle (own expert)"] = oracle
        return out

    def routing_summary(self, method):
        """Held-in routing figures of a token-routed method from its diagnosis (None before it exists):
        {side: own-expert mass averaged over the side's modules and held-in tasks, collapsed modules (more than
        80% of the held-in tasks with the same top expert) / modules, mean common-score fraction}, and the
        per-task own-expert mass per side."""
        path = os.path.join(self.out, METHOD_DIRS[method], "routing_distribution", "diagnosis", "routing_diagnosis.json")
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            diagnosis = json.load(f)
        held_in = {f"D/{scope}/EVAL" for scope in self.held_in.values()}
        sides, per_task = {}, {}
        for side in ("encoder", "decoder"):
            modules = [e for m, e in diagnosis["modules"].items() if m.startswith(side + ".")]
            own = [[v for d, v in e["own_mass"].items() if d in held_in] for e in modules]
            collapsed = 0
            for e in modules:
                tops = [t for d, t in zip(e["tasks"], e["top_expert"]) if d in held_in]
                collapsed += len(tops) >= 2 and max(tops.count(t) for t in tops) / len(tops) > 0.8
            fractions = [e["common_score_fraction"] for e in modules if e["common_score_fraction"] is not None]
            own = [float(np.mean(v)) for v in own if v]
            sides[side] = {"own": float(np.mean(own)) if own else None, "collapsed": collapsed,
                           "modules": len(modules), "common": float(np.mean(fractions)) if fractions else None}
            for name, scope in self.held_in.items():
                values = [e["own_mass"][f"D/{scope}/EVAL"] for e in modules if f"D/{scope}/EVAL" in e["own_mass"]]
                per_task.setdefault(name, {})[side] = float(np.mean(values)) if values else None
        return {"sides": sides, "per_task": per_task, "chance": diagnosis["chance"]}

    def columns(self):
        """[(scope stem, task, held-in?, metric, chance)] in table order."""
        rows = []
        for scope, held_in in [(s, True) for s in self.held_in.values()] + [(s, False) for s in self.held_out]:
            task = task_of_scope(scope)
            rows.append((scope, task, held_in) + task_format(task))
        return rows

    def report(self) -> str:
        scores = self.scores()
        columns = self.columns()
        held_in = [c for c in columns if c[2]]

        def avg(values):
            values = [v for v in values if v is not None]
            return f"{np.mean(values):.3f}" if values else "-"

        def row(label, per_scope):
            cells = [per_scope.get(f"D/{c[0]}/EVAL") for c in columns]
            ins, outs = cells[: len(held_in)], cells[len(held_in):]
            return (f"| {label} | {avg(ins)} | {avg(outs)} | "
                    + " | ".join("-" if v is None else f"{v:.3f}" for v in cells) + " |")

        lines = ["# Quickstart: PHATGOOSE and baselines on the toy world", "",
                 f"Scores on {self.budget.eval_examples} validation examples per task (accuracy for classification by rank classification, "
                 "exact match for generation). Held-in tasks (in) each have an expert of their own; held-out tasks "
                 "(out) have none. The chance row is what guessing among the answer choices scores.", "",
                 "| method | held-in avg | held-out avg | "
                 + " | ".join(f"{task} ({'in' if held else 'out'}, {'acc' if metric == 'accuracy' else 'EM'})"
                              for _, task, held, metric, _ in columns) + " |",
                 "|---" * (3 + len(columns)) + "|"]
        lines += [row(method, per_task) for method, per_task in scores.items()]
        lines.append(row("Chance", {f"D/{c[0]}/EVAL": c[4] for c in columns}))
        oracle = [scores["Oracle (own expert)"].get(f"D/{c[0]}/EVAL") for c in held_in]
        phatgoose = [scores["PHATGOOSE"].get(f"D/{c[0]}/EVAL") for c in held_in]
        if None not in oracle + phatgoose and np.mean(oracle) > 0:
            lines += ["", f"PHATGOOSE reaches {np.mean(phatgoose) / np.mean(oracle):.2f} of Oracle on the held-in tasks."]
        summaries = {m: self.routing_summary(m) for m in ROUTED}
        summaries = {m: v for m, v in summaries.items() if v is not None}
        if summaries:
            chance = next(iter(summaries.values()))["chance"]
            lines += ["", f"Held-in routing (scripts/analyze_routing.py; own-expert mass = routing probability on the "
                          f"task's own expert, averaged over the linears of each stack and the held-in tasks, chance "
                          f"{chance:.3f}; a linear is collapsed when more than 80% of the held-in tasks share its top "
                          "expert; common-score fraction = share of the router scores' spread across experts that is "
                          "the same for every token):", "",
                      "| method | encoder own-expert mass | decoder own-expert mass | collapsed encoder linears | "
                      "collapsed decoder linears | common-score fraction, encoder | common-score fraction, decoder |",
                      "|---|---|---|---|---|---|---|"]
            for method, summary in summaries.items():
                enc, dec = summary["sides"]["encoder"], summary["sides"]["decoder"]
                lines.append(f"| {method} | {_fmt(enc['own'])} | {_fmt(dec['own'])} | {enc['collapsed']}/{enc['modules']} | "
                             f"{dec['collapsed']}/{dec['modules']} | {_fmt(enc['common'])} | {_fmt(dec['common'])} |")
            if "PHATGOOSE" in summaries:
                lines += ["", "PHATGOOSE, own-expert mass per held-in task:", "",
                          "| task | encoder | decoder |", "|---|---|---|"]
                lines += [f"| {name} | {_fmt(v['encoder'])} | {_fmt(v['decoder'])} |"
                          for name, v in summaries["PHATGOOSE"]["per_task"].items()]
        text = "\n".join(lines) + "\n"
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(text)
        return text


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def _slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def _last_scores(path):
    if not os.path.isfile(path):
        return {}
    results = read_results(path)[-1][1]
    return {k: v["score"] for k, v in results.items() if isinstance(v, dict)}


def _tail(path, lines=30):
    with open(path) as f:
        return "".join(f.readlines()[-lines:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="a reduced run (fewer steps and examples)")
    parser.add_argument("--root", default=None, help="folder under exp_out/ (default quickstart, or quickstart_fast)")
    parser.add_argument("--jobs", type=int, default=2, help="stages run in parallel (one per core)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MODEL_TYPE", "tiny")
    set_reproducible_cpu_env()  # every stage's process: AVX2 kernels, one thread (the same table on any machine)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    budget = Budget.fast() if args.fast else Budget()
    Pipeline(budget, args.root or (ROOT + "_fast" if args.fast else ROOT)).run(args.jobs)


if __name__ == "__main__":
    main()
