"""Tables and plots of the Shakespeare experiment: ``results.md`` and three PNG plots.

``write_report(results, out)`` takes the ``results`` dict built by ``shakespeare_speakers.py``
(τ values are numbers or the string ``"inf"``; τ=0 means independent adapters, ``"inf"`` one joint
adapter) and writes ``results.md``, ``perplexity_vs_tau.png``, ``improvement_vs_size.png`` and
``distance_vs_size.png`` into ``out``.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PAPER = {0: 16.80, 1: 16.59, 10: 12.85, 100: 12.82, 1000: 13.26, 10000: 13.91}
DPI = 100


def as_float(tau: float | str) -> float:
    """τ as a float: ``"inf"`` becomes ``math.inf``."""
    return math.inf if tau == "inf" else float(tau)


def tau_text(tau: float | str) -> str:
    """Short label of a τ value: ``0 (indep.)``, ``100``, ``1e+04``, ``∞ (joint)``."""
    value = as_float(tau)
    if value == 0:
        return "0 (indep.)"
    if math.isinf(value):
        return "∞ (joint)"
    return f"{value:g}"


def tau_symbol(tau: float | str) -> str:
    """τ for running text: ``0``, ``100``, ``∞``."""
    value = as_float(tau)
    return "∞" if math.isinf(value) else f"{value:g}"


def relative_gain(best: float, reference: float) -> float:
    """Relative improvement in % of ``best`` over ``reference`` (positive = lower perplexity)."""
    return 100.0 * (reference - best) / reference


def find_entry(sweep: list[dict], tau: float) -> dict | None:
    """The sweep entry of τ, or None when τ is not in the grid."""
    return next((entry for entry in sweep if as_float(entry["tau"]) == tau), None)


def is_sweep(run: dict) -> bool:
    """A MAP fit of the τ sweep (not the paper's objective or the clustered prior, also MAP)."""
    return run["guide"] == "map" and "clusters" not in run and (not isinstance(run["tau"], str) or run["tau"] == "inf")


def tasks_by_size(results: dict) -> list[str]:
    """Task names sorted by number of training documents (then by name)."""
    return sorted(results["tasks"], key=lambda name: (results["tasks"][name]["train_docs"], name))


def header(results: dict) -> list[str]:
    """Command, run time, base model and the τ chosen on validation."""
    base = results["base_model"]
    if "n_params" in base:
        config = base.get("config", {})
        model = (f"small GPT-2 pretrained on the non-task plays ({base['n_params']:,} parameters, "
                 f"{config.get('n_layer', '?')} layers, width {config.get('n_embd', '?')}, "
                 f"held-out ppl {base.get('val_ppl', math.nan):.2f})")
    else:
        model = f"`{base.get('model', '?')}`"
    if "base_plays_perplexity" in base:
        model += (f" (perplexity {base['base_plays_perplexity']:.2f} on {base['base_plays_documents']} held-out "
                  "speeches of the other plays)")
    return ["# BoRA on Shakespeare speakers", "",
            f"- Command: `{results['command']}`",
            f"- Run time: {results['minutes']} min{machine_text(results)}",
            f"- Base model: {model}",
            f"- Tasks: {len(results['tasks'])} speakers",
            f"- Best τ on validation: **{tau_text(results['best_tau_on_validation'])}**", ""]


def machine_text(results: dict) -> str:
    """Where the run time was measured: the CPU and whether the fits ran under bf16 autocast."""
    machine, settings = results.get("machine"), results.get("settings", {})
    if not machine:
        return ""
    features = ", ".join(machine["cpu_bf16_features"]) or "none"
    precision = "bf16 autocast" if settings.get("bf16") else "float32"
    return (f" on {machine['processor']} ({machine['torch_threads']} threads, bf16 instructions: {features}); "
            f"fits in {precision}, test perplexity in float32")


def tau_table(results: dict) -> list[str]:
    """Paper-style table: one row per τ, plus base model, mean-field VI and learned τ."""
    lines = ["## Test perplexity by τ", "",
             "The paper's numbers are on a different corpus and model (Talk of Norway, OPT-350m): "
             "compare the shape of the curve, not the values.", "",
             "| τ | test perplexity (mean ± std) | per seed | validation perplexity | paper (test) |",
             "|---|---|---|---|---|"]
    best = as_float(results["best_tau_on_validation"])
    for entry in results["sweep"]:
        tau = as_float(entry["tau"])
        seeds = ", ".join(f"{p:.2f}" for p in entry["seeds"])
        mark = " ← best on validation" if tau == best else ""
        paper = f"{PAPER[tau]:.2f}" if tau in PAPER else "–"
        lines.append(f"| {tau_text(tau)}{mark} | {entry['perplexity']:.2f} ± {entry['perplexity_std']:.2f} "
                     f"| {seeds} | {entry['validation_perplexity']:.2f} | {paper} |")
    lines.append(f"| base model (no adapter) | {results['base_model']['perplexity']:.2f} | – | – | – |")
    mf = results.get("mean_field")
    if mf:
        lines.append(f"| mean-field VI at τ={tau_symbol(mf['tau'])} | {mf['perplexity']:.2f} ± {mf['perplexity_std']:.2f} "
                     f"| {', '.join(f'{p:.2f}' for p in mf['seeds'])} | {mf['validation_perplexity']:.2f} | – |")
    learned = results.get("learned_tau")
    if learned:
        low, high = learned["tau_ci"]
        method = " by the Laplace step" if learned.get("tau_posterior") == "laplace" else ""
        guide = (f" (the guide's own q(τ): {learned['guide_tau_median']:.4g}, {learned['guide_tau_ci'][0]:.4g}–"
                 f"{learned['guide_tau_ci'][1]:.4g})" if "guide_tau_ci" in learned else "")
        lines.append(f"| learned τ (one run, no sweep): posterior median {learned['tau_median']:.4g}, 90 % interval "
                     f"{low:.4g}–{high:.4g}{method}{guide} | {learned['perplexity']:.2f} | – "
                     f"| {learned['validation_perplexity']:.2f} | – |")
    paper = results.get("paper_objective")
    if paper:
        taus = sorted(paper["equivalent_tau"])
        lines.append(f"| the paper's objective, τ_p = {paper['tau_p']:g} (one run; Gaussian τ it amounts to: "
                     f"median {taus[len(taus) // 2]:.3g}, {taus[0]:.3g}–{taus[-1]:.3g} by speaker) "
                     f"| {paper['perplexity']:.2f} | – | {paper['validation_perplexity']:.2f} | {PAPER[100]:.2f} |")
    clustered = results.get("clustered_prior")
    if clustered:
        lines.append(f"| clustered by play (user-written prior, {clustered['clusters']} plays), τ={tau_symbol(clustered['tau'])} "
                     f"(one run) | {clustered['perplexity']:.2f} | – | {clustered['validation_perplexity']:.2f} | – |")
    return lines + [""]


def fits_table(results: dict) -> list[str]:
    """How every fit stopped, and the mean-field scales' diagnostics."""
    lines = ["## How each fit stopped", "",
             "Every fit stops by its own criterion: `patience` (validation did not improve for that many checks), "
             "`elbo` (the ELBO flat within its noise, `bora_pyro.convergence`) or `cap` (the step cap; "
             "*still improving* if the ELBO still rose or validation was best at the last check). Task scales "
             "(mean-field parts only): share that moved by more than 2× from their start, and contraction "
             "1 − posterior var / prior var (`bora_pyro.diagnostics`).", "",
             "| fit | seed | steps | best step | stopped by | seconds | task scales moved | contraction |",
             "|---|---|---|---|---|---|---|---|"]
    for run in results["runs"]:
        label = f"τ={tau_symbol(run['tau'])} {run['guide']}" if not isinstance(run["tau"], str) or run["tau"] == "inf" \
            else f"{run['tau']} ({run['guide']})"
        if "clusters" in run:
            label = f"clustered by play, τ={tau_symbol(run['tau'])}"
        task = run.get("diagnostics", {}).get("sites", {}).get("task", {})
        moved = "–" if task.get("scales_moved") is None else f"{task['scales_moved']:.0%}"
        contraction = "–" if task.get("contraction") is None else f"{task['contraction']:.3f}"
        stopped = run.get("stopped_by", "?") + (", still improving" if run.get("still_improving") else "")
        lines.append(f"| {label} | {run['seed']} | {run['steps']} | {run['best_step']} | {stopped} | {run['seconds']:.0f} "
                     f"| {moved} | {contraction} |")
    return lines + [""]


def task_table(results: dict) -> list[str]:
    """Per-task test perplexity by τ (row minimum in bold) and the gain of the best τ over the extremes."""
    sweep, best = results["sweep"], as_float(results["best_tau_on_validation"])
    best_entry, indep, joint = find_entry(sweep, best), find_entry(sweep, 0.0), find_entry(sweep, math.inf)
    lines = ["## Test perplexity per task", "",
             f"Mean over seeds; the lowest value of each row in bold. Gain: relative improvement of "
             f"τ={tau_symbol(best)} (best on validation) over τ=0 / τ=∞.", "",
             "| speaker | train docs | " + " | ".join(tau_text(e["tau"]) for e in sweep) + " | gain vs 0 / ∞ |",
             "|---|---|" + "---|" * len(sweep) + "---|"]
    wins = inner = 0
    for name in tasks_by_size(results):
        values = [entry["tasks"][name] for entry in sweep]
        inner += any(v == min(values) for v, e in zip(values, sweep) if 0 < as_float(e["tau"]) < math.inf)
        cells = [f"**{v:.2f}**" if v == min(values) else f"{v:.2f}" for v in values]
        mine = best_entry["tasks"][name]
        gains = [f"{relative_gain(mine, ref['tasks'][name]):+.2f} %" if ref else "–" for ref in (indep, joint)]
        wins += all(ref is None or mine < ref["tasks"][name] for ref in (indep, joint))
        lines.append(f"| {name} | {results['tasks'][name]['train_docs']} | " + " | ".join(cells)
                     + f" | {' / '.join(gains)} |")
    count = len(results["tasks"])
    if 0 < best < math.inf:
        summary = (f"On the means over seeds, τ={tau_symbol(best)} beats both τ=0 and τ=∞ on **{wins} of {count}** "
                   f"tasks; seed by seed on {' and '.join(map(str, seed_wins(results, best)))} of {count}.")
    else:
        summary = (f"The best τ on validation is an extreme (τ={tau_symbol(best)}); an intermediate τ has the "
                   f"lowest perplexity on **{inner} of {count}** tasks.")
    return lines + ["", summary, ""]


def seed_wins(results: dict, best: float) -> list[int]:
    """Per seed, the tasks on which the MAP fit at τ = ``best`` beats both the τ = 0 and τ = ∞ fits."""
    def fit_at(tau: float, seed: int) -> dict:
        return next(run for run in results["runs"]
                    if is_sweep(run) and run["seed"] == seed and as_float(run["tau"]) == tau)

    seeds = sorted({run["seed"] for run in results["runs"] if is_sweep(run)})
    return [sum(all(fit_at(best, seed)["tasks"][name] < fit_at(extreme, seed)["tasks"][name]
                    for extreme in (0.0, math.inf)) for name in results["tasks"]) for seed in seeds]


def x_positions(taus: list[float]) -> dict[float, float]:
    """Plot positions: finite τ>0 at log10(τ), τ=0 one and a half decades left, ∞ as far right."""
    finite = [math.log10(t) for t in taus if 0 < t < math.inf]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    gap = 1.5 if finite else 0.5
    return {t: low - gap if t == 0 else high + gap if math.isinf(t) else math.log10(t) for t in taus}


def plot_perplexity(results: dict, path: Path) -> None:
    """Test perplexity vs τ: overall (bold, error bars over seeds) and each task (thin grey)."""
    taus = [as_float(e["tau"]) for e in results["sweep"]]
    pos = x_positions(taus)
    xs = [pos[t] for t in taus]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in results["tasks"]:
        ax.plot(xs, [e["tasks"][name] for e in results["sweep"]], color="grey", lw=0.7, alpha=0.5)
    ax.errorbar(xs, [e["perplexity"] for e in results["sweep"]], yerr=[e["perplexity_std"] for e in results["sweep"]],
                color="black", lw=2.5, marker="o", capsize=4, label="all tasks (± std over seeds)")
    ax.plot([], [], color="grey", lw=0.7, label="one task")
    ax.set_xticks(xs, [tau_text(t) if t == 0 or math.isinf(t) else f"$10^{{{math.log10(t):g}}}$" for t in taus])
    ax.set_xlabel("prior precision τ")
    ax.set_ylabel("test perplexity")
    ax.set_title("Test perplexity vs τ")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def plot_improvement(results: dict, path: Path) -> None:
    """Relative improvement (%) of the best τ over τ=0 and over τ=∞, per task vs training documents."""
    sweep, best = results["sweep"], as_float(results["best_tau_on_validation"])
    mine = find_entry(sweep, best)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for tau, marker, label in ((0.0, "o", "over τ=0 (independent)"), (math.inf, "s", "over τ=∞ (joint)")):
        ref = find_entry(sweep, tau)
        if ref is None:
            continue
        names = list(results["tasks"])
        ax.scatter([results["tasks"][n]["train_docs"] for n in names],
                   [relative_gain(mine["tasks"][n], ref["tasks"][n]) for n in names], marker=marker, label=label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("training documents of the task")
    ax.set_ylabel("relative improvement (%)")
    ax.set_title(f"Gain of τ={tau_symbol(best)} (best on validation) per task")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, path)


def distance_tau(results: dict) -> float | None:
    """The best τ if finite and positive, else the finite τ>0 with the lowest validation perplexity."""
    best = as_float(results["best_tau_on_validation"])
    if 0 < best < math.inf:
        return best
    finite = [e for e in results["sweep"] if 0 < as_float(e["tau"]) < math.inf]
    return as_float(min(finite, key=lambda e: e["validation_perplexity"])["tau"]) if finite else None


def plot_distance(results: dict, path: Path) -> None:
    """‖θ_d − Θ‖ per task vs training documents (MAP runs at the chosen finite τ, mean over seeds)."""
    tau = distance_tau(results)
    runs = [r for r in results["runs"] if is_sweep(r) and r.get("distances") is not None
            and tau is not None and as_float(r["tau"]) == tau]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if runs:
        names = sorted(results["tasks"])
        distances = [statistics.mean(r["distances"][i] for r in runs) for i in range(len(names))]
        ax.scatter([results["tasks"][n]["train_docs"] for n in names], distances)
        seeds = f"mean over {len(runs)} seeds" if len(runs) > 1 else "1 seed"
        ax.set_title(f"Distance of task adapters from Θ at τ={tau_symbol(tau)} ({seeds})")
    else:
        ax.text(0.5, 0.5, "no finite τ > 0 with distances", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training documents of the task")
    ax.set_ylabel("‖θ_d − Θ‖")
    ax.grid(alpha=0.3)
    save(fig, path)


def save(fig: plt.Figure, path: Path) -> None:
    """Save a figure as a small PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    """Write ``results.md`` and the three PNG plots of ``results`` into the folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = header(results) + tau_table(results) + task_table(results) + fits_table(results)
    lines += ["## Plots", "", "![perplexity vs τ](perplexity_vs_tau.png)", "",
              "![improvement vs task size](improvement_vs_size.png)", "",
              "![distance vs task size](distance_vs_size.png)", ""]
    (out / "results.md").write_text("\n".join(lines))
    plot_perplexity(results, out / "perplexity_vs_tau.png")
    plot_improvement(results, out / "improvement_vs_size.png")
    plot_distance(results, out / "distance_vs_size.png")
