"""Result figures (colm/procedures/plots.py): written with the right names beside the results, non-empty, with
bars equal to the table's values (read back from the drawn bars, not the pixels), and logged to wandb when
wandb is on (colm/utils/logging.py)."""

import os
import re
import sys
import types

import numpy as np
import pytest

from colm.datasets.settings import get_setting
from colm.formats.layout import RESULTS_FILE, TASK_BY_EXPERT_FILES
from colm.procedures import plots
from colm.procedures import results as results_module
from colm.procedures import routing_analysis as ra
from colm.procedures.analysis import RoutingDistribution, save_routing_distribution
from colm.procedures.results import RESULTS_FIGURE, read_results, save_results
from colm.utils import logging as run_logging

ENC = "encoder.block.0.layer.0.SelfAttention.q"
DEC = "decoder.block.0.layer.0.SelfAttention.q"


def is_png(path):
    with open(path, "rb") as f:
        return os.path.getsize(path) > 1000 and f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bar_chart_draws_the_values_it_is_given(tmp_path):
    series = {"A": {"x": 0.25, "y": 1.0, "z": None}, "B": {"x": 0.0, "z": 0.125}}
    drawn = plots.bar_chart(series, ["x", "y", "z"], str(tmp_path / "bars.png"), "t", reference={"x": 0.5, "y": None})
    # a missing or None value draws no bar; a 0 draws one of height 0
    assert drawn == {"A": {"x": 0.25, "y": 1.0}, "B": {"x": 0.0, "z": 0.125}}
    assert is_png(tmp_path / "bars.png")
    assert [p.name for p in tmp_path.iterdir()] == ["bars.png"]  # no temporary file left


EVALUATION = {"D/TOYA/EVAL": {"accuracy": 0.5, "score": 0.5}, "D/TOYB/EVAL": {"exact_match": 0.875, "score": 0.875},
              "average_score": 0.6875, "confidence": 0.1875}


def test_a_final_evaluation_draws_results_png_beside_results_txt(tmp_path, monkeypatch):
    drawn = []

    def recording(*args, **kwargs):
        drawn.append(plots.evaluation_bars(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(results_module, "evaluation_bars", recording)
    run = tmp_path / "run"
    save_results(EVALUATION, save_dir=str(run), label="Before training (step 0)")
    save_results(EVALUATION, save_dir=str(run), step=5)
    assert not (run / RESULTS_FIGURE).exists() and drawn == []  # only a final evaluation is drawn
    save_results(EVALUATION, save_dir=str(run))
    assert is_png(run / RESULTS_FIGURE)
    # the bars are results.txt's scores: every dataset's, then the average
    header, table = read_results(str(run / RESULTS_FILE))[-1]
    assert header == "Final results"
    assert drawn == [{"score": {"D/TOYA/EVAL": table["D/TOYA/EVAL"]["score"], "D/TOYB/EVAL": table["D/TOYB/EVAL"]["score"],
                                "average": table["average_score"]}}]
    save_results(EVALUATION, save_dir=str(tmp_path / "unplotted"), plot=False)
    assert not (tmp_path / "unplotted" / RESULTS_FIGURE).exists()


def routing_results():
    """RoutingDistribution's per-dataset summaries for two datasets, two modules (encoder, decoder), 3 experts."""
    def stats(probs):
        return {"mean_probs": np.asarray(probs), "top1_counts": np.zeros(3, dtype=np.int64), "tokens": 4}

    return {"D/TOYA/EVAL": {ENC: stats([0.7, 0.2, 0.1]), DEC: stats([0.5, 0.25, 0.25])},
            "D/TOYB/EVAL": {ENC: stats([0.1, 0.8, 0.1]), DEC: stats([0.2, 0.2, 0.6])}}


class Recorder:
    """A stand-in wandb run: records what is logged."""

    def __init__(self):
        self.logged = []

    def log(self, data, step=None):
        self.logged.append(dict(data))


def test_figures_are_logged_as_wandb_images_when_wandb_is_on(tmp_path, monkeypatch):
    images = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=lambda path: images.append(path) or path))
    run = Recorder()
    monkeypatch.setitem(run_logging._STATE, "run", run)
    save_results(EVALUATION, save_dir=str(tmp_path))
    processor = RoutingDistribution(save_dir=str(tmp_path / "routing_distribution"))
    processor.results = routing_results()
    processor.cross_dataset_process()
    summaries = {side: str(tmp_path / "routing_distribution" / file) for side, file in TASK_BY_EXPERT_FILES.items()}
    assert run.logged == [{"results": str(tmp_path / RESULTS_FIGURE)},
                          {"routing/task_by_expert_encoder": summaries["encoder"],
                           "routing/task_by_expert_decoder": summaries["decoder"]}]
    assert all(is_png(p) for p in images)
    # Without a wandb run nothing is logged, and a wandb that cannot make images does not stop the run.
    monkeypatch.setitem(run_logging._STATE, "run", None)
    run_logging.log_images({"results": str(tmp_path / RESULTS_FIGURE)})
    monkeypatch.setitem(run_logging._STATE, "run", run)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace())
    run_logging.log_images({"results": str(tmp_path / RESULTS_FIGURE)})
    assert len(run.logged) == 2


@pytest.mark.slow
def test_real_wandb_offline_run_folder_gets_the_images(in_tmp_repo, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("EXP_NAME", "offline_plots")
    try:
        run_logging.setup_logger("wandb", "offline_plots")
        run_logging.log_metrics({"P/EVALUATE": {"average_score": 0.6875}}, 3)
        save_results(EVALUATION, save_dir="exp_out/offline_plots")
        processor = RoutingDistribution(save_dir="exp_out/offline_plots/routing_distribution")
        processor.results = routing_results()
        processor.cross_dataset_process()
    finally:
        run_logging.finish_logger()
    (run,) = (in_tmp_repo / "exp_out/offline_plots/wandb").glob("offline-run-*")
    media = sorted(p.name for p in (run / "files/media/images").rglob("*.png"))
    assert any(name.startswith("results_") for name in media)
    assert {"task_by_expert_encoder", "task_by_expert_decoder"} <= {re.sub(r"_\d+_.*", "", n) for n in media}
    assert all(is_png(p) for p in (run / "files/media/images").rglob("*.png"))


# ---- the quickstart's report ---------------------------------------------------------------------------------


def write_quickstart_outputs(pipeline):
    """Fake results.txt of every method and the Oracle, and a routing diagnosis of every token-routed method."""
    from colm.quickstart import METHOD_DIRS, ROUTED, SUFFIX

    rng = np.random.default_rng(0)
    scopes = [f"D/{s}/EVAL" for s in pipeline.held_in.values()] + [f"D/{s}/EVAL" for s in pipeline.held_out]
    for exp in METHOD_DIRS.values():
        per_dataset = {s: {"score": round(float(rng.uniform()), 4)} for s in scopes}
        save_results(per_dataset, save_dir=os.path.join(pipeline.out, exp), plot=False)
    for name, scope in pipeline.held_in.items():
        save_results({f"D/{scope}/EVAL": {"score": 0.9}}, save_dir=os.path.join(pipeline.out, "moe", f"{name}_{SUFFIX}"),
                     plot=False)
    experts = list(pipeline.held_in)
    for method in ROUTED:
        directory = os.path.join(pipeline.out, METHOD_DIRS[method], "routing_distribution")
        os.makedirs(directory)
        for scope in scopes:
            modules = {m: {"mean_probs": rng.dirichlet(np.ones(len(experts))), "tokens": 5,
                           "top1_counts": np.ones(len(experts), dtype=np.int64)} for m in (ENC, DEC)}
            save_routing_distribution(os.path.join(directory, scope.replace("/", "_") + ".safetensors"), scope,
                                      modules, experts)
        ra.run_routing_diagnosis(directory, checkpoint=False)


def markdown_table(text):
    """{row label: {column: cell}} of the first markdown table in text."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:  # after the header and the |---| line, up to the first line outside the table
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def test_quickstart_report_draws_its_table_and_routing_beside_results_md(in_tmp_repo, monkeypatch):
    from colm import quickstart

    pipeline = quickstart.Pipeline(quickstart.Budget.fast(), root="qs_plots")
    assert list(pipeline.held_in) and get_setting(list(pipeline.held_in))
    write_quickstart_outputs(pipeline)
    drawn = {}

    def recording(series, columns, path, title, **kwargs):
        drawn.update(series=series, columns=columns, path=path, reference=kwargs.get("reference"),
                     bars=plots.bar_chart(series, columns, path, title, **kwargs))
        return drawn["bars"]

    monkeypatch.setattr(quickstart, "bar_chart", recording)
    text = pipeline.report()
    out = in_tmp_repo / "exp_out/qs_plots"
    assert is_png(out / RESULTS_FIGURE) and is_png(out / quickstart.ROUTING_FIGURE)
    assert drawn["path"] == os.path.join("exp_out", "qs_plots", RESULTS_FIGURE)
    md = (out / "results.md").read_text()
    assert md == text and f"]({RESULTS_FIGURE})" in md and f"]({quickstart.ROUTING_FIGURE})" in md
    for link in re.findall(r"\]\(([^)]+\.png)\)", md):  # every figure results.md links exists
        assert is_png(out / link), link
    # The bars are the table: every method's row of results.md as it prints them, chance as the reference line.
    table = markdown_table(md)
    assert list(drawn["bars"]) == [m for m in table if m != "Chance"]
    assert drawn["columns"] == list(table["Chance"])
    for method, row in table.items():
        heights = drawn["reference"] if method == "Chance" else drawn["bars"][method]
        for column, cell in row.items():
            if cell == "-":
                assert heights.get(column) is None, (method, column)
            else:
                assert f"{heights[column]:.3f}" == cell, (method, column, heights[column], cell)
    assert table["Oracle (own expert)"]["held-out avg"] == "-"
