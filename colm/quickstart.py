"""The embedded default, end to end: experts, gates, routing and every baseline on the toy world.

    python -m colm.quickstart            # what `bash exp_launch/quickstart.sh` runs
    python -m colm.quickstart --fast     # a reduced run (fewer steps and examples), used by the tests

Every stage is a command of the framework's own launchers and scripts (the same ones the README shows
for T5-XL), run on the tiny T5 with MODEL_TYPE=tiny, each as its own process started from one preloaded
Python (colm/utils/preloaded.py), so that it does not import torch and transformers again. Each finished
stage leaves a marker in exp_out/quickstart/.stages/, so a re-run skips it; each stage's output goes to
exp_out/quickstart/logs/. At the end exp_out/quickstart/results.md holds the method table (held-in average,
held-out average, every task) and the held-in routing figures, and links results.png (the table as bars) and
routing.png (each routed method's task-by-expert mass) beside it; routing heatmaps are under
exp_out/quickstart/<method>/.

The toy world (colm/datasets/toy.py): eight held-in tasks that differ in domain, instruction and output
format (four rank-classification, four generation), one expert each, and five held-out tasks that recombine
seen domains, skills and phrasings (one, counting, is a skill no expert has).
"""

import argparse
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from colm.datasets.settings import get_setting
from colm.datasets.toy import HELD_OUT_TASKS, TOY_NAMES, scope_name, task_format, task_of_scope
from colm.formats.layout import EXP_OUT, EXPERTS_FILE, RESULTS_FILE, TASK_BY_EXPERT_FILES
from colm.procedures.expert_jobs import (
    GATED_SUFFIX,
    SCRIPTS,
    expert_paths,
    gate_commands,
    lora_commands,
    manipulation_command,
)
from colm.procedures.plots import bar_chart, heatmap_grid
from colm.procedures.results import RESULTS_FIGURE, read_results
from colm.procedures.stages import FAILED, SKIPPED, Stage, StageRunner
from colm.utils.progress import progress
from colm.utils.reproducible import set_reproducible_cpu_env

ROOT = "quickstart"  # under exp_out/
HELD_IN = list(TOY_NAMES)
HELD_OUT = [scope_name(task) for task in HELD_OUT_TASKS]
SUFFIX = "tiny_lora"
GATE_SUFFIX = f"{SUFFIX}_{GATED_SUFFIX}"  # tiny_lora_inpgatetrainnogumbel
# Each evaluated method and its folder under exp_out/quickstart/ (holding best.pt and results.txt).
METHOD_DIRS = {"PHATGOOSE": "phatgoose", "PHATGOOSE, centred (beyond the paper)": "phatgoose_centred",
               "Average Activation": "experts_all", "Arrow": "arrow", "Retrieval": "retrieval",
               "Merged Experts": "merged", "Multitask": "multitask", "Base model": "base"}
# Token-routed methods whose routing the report diagnoses (scripts/analyze_routing.py).
ROUTED = ("PHATGOOSE", "PHATGOOSE, centred (beyond the paper)", "Average Activation", "Arrow")
ROUTING_FIGURE = "routing.png"  # beside results.md: every routed method's task-by-expert mass


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
        # A stage without its marker runs again from its first command without a step marker
        # (colm/procedures/stages.py): a training stopped before its marker is redone from step 0 (the same seeds
        # give the same weights), so it may overwrite that run.
        return (f"{self.data_bindings()} P/TRAIN/Trainer.gradient_accumulation_factor=1 P/TRAIN/Trainer.overwrite=True "
                f"P/TRAIN/Trainer.num_steps={steps} P/TRAIN/Trainer.validation_step_interval={interval}")

    def eval_bindings(self, processors=True):
        analysis = "[@WriteOutputText(), @RoutingDistribution()]" if processors else "[@WriteOutputText()]"
        return (f"{self.data_bindings()} P/EVALUATE/Evaluator.datasets={_quote_list(self.eval_scopes)} "
                f"P/EVALUATE/Evaluator.analysis_processors={analysis} P/EVALUATE/save_results.overwrite=True")

    def path(self, *parts):
        return "/".join((self.root,) + parts)

    manip = staticmethod(manipulation_command)

    # ----- the stages ---------------------------------------------------------------------------
    def stages(self):
        b = self.budget
        stages = []
        for name, scope in self.held_in.items():
            # the README's per-expert commands (colm/procedures/expert_jobs.py), under exp_out/quickstart/
            paths = expert_paths(name, SUFFIX, lora_dir=self.path("experts"), expert_dir=self.path("moe"))
            stages.append(Stage(f"expert {name}", lora_commands(scope, paths, self.train_bindings(b.expert_steps))))
            stages.append(Stage(f"average activation {name}", [
                ["bash", f"{SCRIPTS}/reinit_router_embedding.sh", "-exp_name", paths.moe, "-dataset", scope, "-arch", "A2",
                 "-compute_hiddens", "True", "-hiddens_suffix", "_a2", "-max_examples", str(b.avgact_examples),
                 "-extra_bindings", self.data_bindings()],
            ]))
            stages.append(Stage(f"gate {name}", gate_commands(scope, paths, self.train_bindings(b.gate_steps))))
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

    def run(self, jobs=2):
        """Runs the waves one after another (colm/procedures/stages.py: markers in exp_out/<root>/.stages/, logs
        in exp_out/<root>/logs/); the first wave with a failed stage ends the run once its other chains end."""
        started = time.time()
        waves = self.waves()
        total, finished = sum(len(chain) for wave in waves for chain in wave), []
        runner = StageRunner(self.out)
        # On a terminal a bar with the stage count and ETA; in a log, one plain line per finished stage.
        with runner.preloaded(), progress(total=total, desc="quickstart", unit="stage", dynamic_ncols=True) as bar:

            def on_result(result):
                finished.append(result)
                bar.update(1)
                message = ("done before, skipped" if result.status == SKIPPED else
                           f"{result.status} after {result.seconds:.0f}s" if result.status == FAILED else
                           f"{result.seconds:.0f}s")
                tqdm.write(f"[quickstart] {result.name}: {message} ({len(finished)}/{total} stages, "
                           f"{time.time() - started:.0f}s in all)")

            for wave in waves:
                failed = [r for r in runner.run_chains(wave, jobs, on_result) if r.status == FAILED]
                if failed:
                    raise SystemExit("\n".join(f"[quickstart] stage '{r.name}' failed; see {r.log}:\n{r.tail}"
                                                for r in failed))
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

    def table(self):
        """(column labels, {row: {column: value or None}}): what results.md prints and results.png draws. Columns:
        held-in average, held-out average, then every task; rows: every method, Oracle, then Chance. An average is
        over the tasks with a score (None when none has one)."""
        scores = self.scores()
        columns = self.columns()
        task_labels = [f"{task} ({'in' if held else 'out'}, {'acc' if metric == 'accuracy' else 'EM'})"
                       for _, task, held, metric, _ in columns]
        rows = dict(scores)
        rows["Chance"] = {f"D/{c[0]}/EVAL": c[4] for c in columns}
        table = {}
        for label, per_scope in rows.items():
            cells = [per_scope.get(f"D/{c[0]}/EVAL") for c in columns]
            ins = [v for v, c in zip(cells, columns) if c[2] and v is not None]
            outs = [v for v, c in zip(cells, columns) if not c[2] and v is not None]
            table[label] = {"held-in avg": float(np.mean(ins)) if ins else None,
                            "held-out avg": float(np.mean(outs)) if outs else None, **dict(zip(task_labels, cells))}
        return ["held-in avg", "held-out avg"] + task_labels, table

    def figures(self, columns, table):
        """Writes results.png (the table as bars, chance as a line) and, once a routing diagnosis exists,
        routing.png (each token-routed method's task-by-expert mass, encoder and decoder side); returns the
        markdown lines that link them: (lines for under the score table, lines for under the routing tables)."""
        methods = {label: values for label, values in table.items() if label != "Chance"}
        bar_chart(methods, columns, os.path.join(self.out, RESULTS_FIGURE),
                  "Quickstart: score per method (held-in and held-out averages, then every task); line: chance",
                  reference=table["Chance"])
        score_lines, routing_lines = ["", f"![scores per method and task]({RESULTS_FIGURE})"], []
        panels, diagnosed = [], []
        for method in ROUTED:
            diagnosis_dir = "/".join((METHOD_DIRS[method], "routing_distribution", "diagnosis"))
            path = os.path.join(self.out, diagnosis_dir, "routing_diagnosis.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                diagnosis = json.load(f)
            experts = [e["name"] for e in diagnosis["experts"]]
            for side, data in diagnosis["sides"].items():
                panels.append((f"{method}, {side}", data["mass"], [_short(t) for t in data["tasks"]], experts))
            # the diagnosis writes each side's heatmap beside its JSON, the task's own expert outlined
            diagnosed.append(f"{method}: " + ", ".join(f"[{side}]({diagnosis_dir}/{file})"
                                                        for side, file in TASK_BY_EXPERT_FILES.items()))
        if panels:
            heatmap_grid(panels, os.path.join(self.out, ROUTING_FIGURE),
                         "Routing mass by task and expert, mean over the linears of each side")
            routing_lines = ["", f"![routing mass by task and expert]({ROUTING_FIGURE}) (each method's, own expert "
                             f"outlined: {'; '.join(diagnosed)})"]
        return score_lines, routing_lines

    def report(self) -> str:
        scores = self.scores()
        columns = self.columns()
        held_in = [c for c in columns if c[2]]
        labels, table = self.table()

        def row(label):
            return "| " + " | ".join([label] + [_fmt(table[label][column]) for column in labels]) + " |"

        lines = ["# Quickstart: PHATGOOSE and baselines on the toy world", "",
                 f"Scores on {self.budget.eval_examples} validation examples per task (accuracy for classification by rank classification, "
                 "exact match for generation). Held-in tasks (in) each have an expert of their own; held-out tasks "
                 "(out) have none. The chance row is what guessing among the answer choices scores.", "",
                 "| method | " + " | ".join(labels) + " |",
                 "|---" * (1 + len(labels)) + "|"]
        lines += [row(label) for label in table]
        score_figure, routing_figure = self.figures(labels, table)
        lines += score_figure
        oracle = [scores["Oracle (own expert)"].get(f"D/{c[0]}/EVAL") for c in held_in]
        phatgoose = [scores["PHATGOOSE"].get(f"D/{c[0]}/EVAL") for c in held_in]
        chance = np.mean([c[4] for c in held_in])
        if None not in oracle + phatgoose and np.mean(oracle) > chance + 0.05:
            lines += ["", f"PHATGOOSE reaches {np.mean(phatgoose) / np.mean(oracle):.2f} of Oracle on the held-in tasks."]
        elif None not in oracle:
            # the reduced run (--fast) trains too little for its experts to beat chance: no ratio to speak of
            lines += ["", f"Oracle ({np.mean(oracle):.3f}) is not above chance ({chance:.3f}) here: the experts trained "
                          "too little for the table to say anything about the methods."]
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
        lines += routing_figure
        text = "\n".join(lines) + "\n"
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(text)
        return text


def _short(dataset):
    """`D/TOYTOPIC/EVAL` -> `TOYTOPIC` (figure labels)."""
    return dataset.removeprefix("D/").removesuffix("/EVAL")


def _fmt(value):
    return "-" if value is None else f"{value:.3f}"


def _last_scores(path):
    if not os.path.isfile(path):
        return {}
    results = read_results(path)[-1][1]
    return {k: v["score"] for k, v in results.items() if isinstance(v, dict)}


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
