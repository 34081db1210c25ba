"""Result figures, written as PNG beside the results they show (matplotlib, Agg backend: no display needed).

- `bar_chart`: grouped bars, one group per column (a task, or an average), one bar per series (a method, or a
  run); returns the heights it drew, read back from the drawn bars, so that tests compare them with the table.
- `evaluation_bars`: the bars of one evaluation's results dict (what save_results writes to results.txt).
- `heatmap_grid`: several tasks x experts mass matrices side by side (the quickstart's routing summary).
"""

import textwrap

import numpy as np

from colm.utils.atomic import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    plt = pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def bar_chart(series, columns, path, title, ylabel="score", reference=None, reference_label="chance"):
    """Writes grouped bars to `path` and returns {series label: {column: height}} read back from the drawn bars.

    series: {label: {column: value}}, in legend order; a missing or None value draws no bar (and is absent from
    the returned dict). columns: the x groups, in order. reference: optional {column: value} drawn as a black
    line across its group (e.g. chance)."""
    plt = pyplot()
    columns = list(columns)
    labels = list(series)
    width = 0.8 / max(len(labels), 1)
    fig_width = min(40.0, max(8.0, 0.12 * len(columns) * max(len(labels), 1) + 3.0))
    fig, ax = plt.subplots(figsize=(fig_width, 4.8))
    drawn = {}  # bar container -> series label
    for i, label in enumerate(labels):
        values = series[label]
        xs = [c for c, column in enumerate(columns) if values.get(column) is not None]
        heights = [float(values[columns[c]]) for c in xs]
        offset = (i - (len(labels) - 1) / 2) * width
        container = ax.bar([c + offset for c in xs], heights, width=width, label=label)
        drawn[container] = (label, [columns[c] for c in xs])
    legend_label = reference_label  # the reference's legend entry, on its first line only
    for c, column in enumerate(columns):
        value = (reference or {}).get(column)
        if value is not None:
            ax.hlines(value, c - 0.45, c + 0.45, colors="black", linewidth=1.2, label=legend_label)
            legend_label = None
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    fig.suptitle("\n".join(textwrap.wrap(title, int(fig_width * 10))), fontsize=9)
    ax.legend(fontsize=6, ncol=max(1, len(labels) // 6 + 1), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    plotted = {}
    for container, (label, names) in drawn.items():
        plotted[label] = {name: patch.get_height() for name, patch in zip(names, container.patches)}
    _save(fig, path)
    return plotted


def evaluation_scores(results):
    """{column: score} of one evaluation's results dict ({dataset: {..., "score"}, "average_score", ...}):
    every dataset's score, then "average"."""
    scores = {name: value["score"] for name, value in results.items() if isinstance(value, dict) and "score" in value}
    if results.get("average_score") is not None:
        scores["average"] = results["average_score"]
    return scores


def evaluation_bars(results, path, title):
    """One evaluation's bars (each dataset's score and the average); returns what bar_chart returns."""
    scores = evaluation_scores(results)
    return bar_chart({"score": scores}, list(scores), path, title)


def heatmap_grid(panels, path, title):
    """panels: [(panel title, matrix (tasks x experts), task names, expert names)], drawn in a grid of two columns
    (in the order given) with a shared colour scale from 0."""
    plt = pyplot()
    if not panels:
        raise ValueError("heatmap_grid needs at least one panel.")
    rows = -(-len(panels) // 2)
    cols = 1 if len(panels) == 1 else 2
    top = max(float(np.max(np.asarray(m, dtype=np.float64), initial=0.0)) for _, m, _, _ in panels) or 1.0
    n_experts = max(len(e) for _, _, _, e in panels)
    n_tasks = max(len(t) for _, _, t, _ in panels)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * max(4.5, 0.3 * n_experts + 3), rows * max(3.0, 0.3 * n_tasks + 2)))
    for ax, (panel_title, matrix, tasks, experts) in zip(axes.flat, panels):
        image = ax.imshow(np.asarray(matrix, dtype=np.float64), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_xticks(range(len(experts)))
        ax.set_xticklabels(experts, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels(tasks, fontsize=6)
        ax.set_title(panel_title, fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label="routing mass", shrink=0.8)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
