"""Figures of the predictive analysis: reliability diagrams and posterior predictive checks.

matplotlib is optional (``pip install 'bora-pyro[analysis]'``); it is imported when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError


def pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line error naming the extra."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("figures need matplotlib: pip install 'bora-pyro[analysis]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_reliability(curves: dict[str, dict], path: str | Path, title: str = "next-token top-1 predictions") -> None:
    """A reliability diagram: per estimator, accuracy against mean confidence of each bin (a
    :func:`~bora_pyro.calibration.calibration` report's ``reliability``), with the diagonal
    of perfect calibration and each bin's share of tokens below."""
    plt = pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, curve in curves.items():
        top.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3, label=name)
        total = sum(curve["count"])
        bottom.plot(curve["confidence"], [c / total for c in curve["count"]], marker="o", markersize=3)
    top.set(ylabel="accuracy of the top-1 token", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend()
    bottom.set(xlabel="confidence (mean top-1 probability of the bin)", ylabel="share of tokens", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ppc(report: dict, path: str | Path, max_tasks: int = 6) -> None:
    """One panel per statistic of a :func:`~bora_pyro.ppc.posterior_predictive_check` report:
    for up to ``max_tasks`` tasks, the S replicated values (dots) and the observed one (red bar),
    with the p-value."""
    plt = pyplot()
    tasks = list(report["tasks"])[:max_tasks]
    statistics = list(report["tasks"][tasks[0]])
    fig, axes = plt.subplots(1, len(statistics), figsize=(4 * len(statistics), 0.5 * len(tasks) + 1.5), sharey=True)
    for axis, statistic in zip(axes, statistics):
        for row, task in enumerate(tasks):
            entry = report["tasks"][task][statistic]
            replicated = [value for value in entry["replicated"] if value is not None]
            axis.scatter(replicated, [row] * len(replicated), s=8, alpha=0.5, color="C0")
            if entry["observed"] is not None:
                axis.plot([entry["observed"]] * 2, [row - 0.35, row + 0.35], color="red", linewidth=2)
            if entry["p_value"] is not None:
                axis.annotate(f"p={entry['p_value']:.2f}", (1.0, row + 0.2), xycoords=("axes fraction", "data"),
                              ha="right", va="bottom", fontsize=7)
        axis.set(title=statistic, yticks=range(len(tasks)))
    axes[0].set_yticklabels([task[:28] for task in tasks], fontsize=7)
    fig.suptitle(f"posterior predictive check: {report['samples']} replicated sets (dots) vs held-out (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
