"""The evidence as figures (matplotlib, Agg backend), each saved as PNG and SVG.

- `loss_vs_rank`: eval loss vs r (log2 axis), one point per seed, the mean ± spread per rank,
  early-stopped trials hollow and labelled with the step they reached, the recommendation
  highlighted, each rank's adequacy threshold at the step it was judged; beside it the quantity the
  rule uses: the share of the best rank's gain over the base (or the gap, for the other rules).
- `loss_vs_lr`: each rank's loss at each learning rate searched (unstable arms crossed).
- `loss_vs_cost`: eval loss vs trainable parameters and vs adapter size (MB), Pareto frontier drawn.
- `cost_by_choice` (several target choices): share of the best gain (or eval loss) vs trainable
  parameters, one line per target choice, the Pareto frontier across all, the verdict starred.
  With several choices the per-rank figures above show the recommended choice's ranks.
- `learning_curves`: eval and train loss vs optimizer step, one line per trial, coloured by rank.
- `effective_rank`: energy rank (90%) and stable rank of each trained adapter vs r.

Over 400 lines: one function per figure plus the registry (`PLOTS`); each figure reads alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd

from lora_rank_search.analysis.selection import Recommendation, trial_curves
from lora_rank_search.contract.arms import CHOICE_KEY, format_lr

LOSS_LABEL = "eval loss (nats/token)"
RANK_LABEL = "LoRA rank r (log2 scale)"
HIGHLIGHT = "#d62728"
OK_COLOR = "#2ca02c"
MUTED = "#7f7f7f"
PNG_DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "lora-rank-search", "font.size": 9,
                         "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _save(fig, out_dir: str, name: str) -> dict:
    """The figure as PNG and SVG, cropped to what it draws. The crop is measured once, at the PNG's
    resolution: `bbox_inches="tight"` would lay the figure out again for each file, and the layout
    (mostly text) is most of a figure's cost."""
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    fig.set_dpi(PNG_DPI)
    fig.draw_without_rendering()
    crop = fig.get_tightbbox().padded(plt.rcParams["savefig.pad_inches"])
    paths = {}
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=PNG_DPI if ext == "png" else None, bbox_inches=crop, metadata={"Date": None} if ext == "svg" else None)
        paths[ext] = path
    plt.close(fig)
    return paths


def _rank_axis(ax, ranks) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(int(r) for r in ranks)))
    ax.get_xaxis().set_major_formatter(_int_formatter())
    ax.minorticks_off()
    ax.set_xlabel(RANK_LABEL)


def _int_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:g}")


def _trial_points(trials: pd.DataFrame, history: pd.DataFrame, rec: Recommendation) -> pd.DataFrame:
    """Per usable trial: r, seed, last step, best-so-far at its last step, stopped_early."""
    curves = rec.curves if rec.curves is not None else trial_curves(trials, history)
    if curves.empty:
        return pd.DataFrame(columns=["trial_id", "r", "seed", "step", "best_loss", "stopped_early"])
    last = curves.sort_values("step").groupby("trial_id").tail(1)
    # Hollow: the trial ended before max_steps (stopped by the scheduler, interrupted or failed).
    short = trials.set_index(trials["trial_id"].astype(str))
    short = (short["steps"] < short["max_steps"]) if {"steps", "max_steps"} <= set(short) else None
    last = last.assign(stopped_early=[bool(short.get(t, False)) if short is not None else False for t in last["trial_id"]])
    return last.reset_index(drop=True)


def loss_vs_rank(trials: pd.DataFrame, history: pd.DataFrame, rec: Recommendation, out_dir: str) -> dict:
    plt = _plt()
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(11, 4.2))
    points = _trial_points(trials, history, rec)
    ranks = [e.r for e in rec.ranks]
    for p in points.itertuples():
        ax.scatter(p.r, p.best_loss, s=28, zorder=3, facecolors="none" if p.stopped_early else "#1f77b4", edgecolors="#1f77b4")
        if p.stopped_early:
            ax.annotate(f"@{p.step}", (p.r, p.best_loss), textcoords="offset points", xytext=(4, 3), fontsize=6, color=MUTED)
    if rec.ranks:
        # No line joins the ranks: each is judged at its own step, so a line would mix steps.
        ax.errorbar(ranks, [e.loss for e in rec.ranks], yerr=[e.se for e in rec.ranks], fmt="D", ms=5, color="black",
                    capsize=3, lw=1, zorder=4, label="each rank at its best learning rate and judged step (mean ± SE)")
    if rec.rank is not None:
        ax.scatter([rec.rank], [rec.loss], s=220, marker="*", color=HIGHLIGHT, zorder=4, label=f"recommended r={rec.rank}")
        ax.axvline(rec.rank, color=HIGHLIGHT, ls=":", lw=1)
    for i, e in enumerate(rec.ranks):  # each rank against the threshold of the step it was judged at
        ax.plot([e.r / 1.25, e.r * 1.25], [e.threshold] * 2, "-", color=OK_COLOR, lw=1.6,
                label="adequate up to here (at the step each rank was judged)" if i == 0 else None)
    if math.isfinite(rec.base_eval_loss):
        ax.axhline(rec.base_eval_loss, color=MUTED, ls="--", lw=0.8, label=f"untouched base {rec.base_eval_loss:.4f}")
    _rank_axis(ax, ranks or [1])
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Eval loss vs rank (best so far, per trial)")
    handles, _ = ax.get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker="o", color="#1f77b4", label="trial that ran to max_steps"),
                Line2D([], [], ls="", marker="o", mfc="none", color="#1f77b4", label="trial that ended earlier (@ the step it reached)")]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if rec.rule_name == "gain":
        _gain_panel(gx, rec)
    else:
        _gap_panel(gx, rec)
    fig.suptitle(f"Which rank? {rec.reason}" if rec.rank is not None else rec.reason, fontsize=9)
    return _save(fig, out_dir, "loss_vs_rank")


def _gain_panel(ax, rec: Recommendation) -> None:
    """Each rank's share of the best rank's gain over the base, at the step it was judged."""
    if not rec.ranks:
        ax.set_axis_off()
        return
    xs = [e.r for e in rec.ranks]
    shares = [100 * e.gain_share if math.isfinite(e.gain_share) else 0.0 for e in rec.ranks]
    colors = [HIGHLIGHT if e.r == rec.rank else (OK_COLOR if e.adequate else MUTED) for e in rec.ranks]
    ax.bar(xs, shares, width=[0.35 * x for x in xs], color=colors, align="center")
    for e, share in zip(rec.ranks, shares):
        what = "best" if e.r == e.ref_rank else f"vs r={e.ref_rank}"
        ax.annotate(f"{share:.0f}%\nstep {e.evidence_step}\n{what}", (e.r, share), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=6.5, color=HIGHLIGHT if e.r == rec.rank else MUTED)
    ax.axhline(100 * (1 - rec.tolerance), color=OK_COLOR, ls="--", lw=1,
               label=f"adequate: at least {1 - rec.tolerance:.0%} of the best gain at the same step")
    _rank_axis(ax, xs)
    ax.set_ylim(min(0.0, min(shares) * 1.1), 125)
    ax.set_ylabel("share of the best rank's gain over the base (%)")
    ax.set_title("The rule: share of the achievable gain, at the same step")
    ax.legend(fontsize=7, loc="lower right")


def _gap_panel(ax, rec: Recommendation) -> None:
    if not rec.ranks:
        ax.set_axis_off()
        return
    gaps = [100 * e.gap for e in rec.ranks]
    colors = [HIGHLIGHT if e.r == rec.rank else (OK_COLOR if e.adequate else MUTED) for e in rec.ranks]
    xs = [e.r for e in rec.ranks]
    ax.bar(xs, gaps, width=[0.35 * x for x in xs], color=colors, align="center")
    for e, g in zip(rec.ranks, gaps):
        what = "best" if e.r == e.ref_rank else f"vs r={e.ref_rank}"
        ax.annotate(f"step {e.evidence_step}\n{what}", (e.r, g), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=7, color=HIGHLIGHT if e.r == rec.rank else MUTED)
    tol = 100 * rec.tolerance
    ax.axhspan(0, max(tol, 1e-9), color=OK_COLOR, alpha=0.15, label=f"within tolerance ({rec.tolerance:.1%})"
               if rec.rule_name == "relative" else f"within tolerance ({rec.tolerance:g} nats/token at the best)")
    if max(gaps) > 20 * max(tol, 1e-3):
        ax.set_yscale("symlog", linthresh=max(tol, 0.1))
    _rank_axis(ax, xs)
    ax.margins(y=0.15)
    ax.set_ylabel("gap to the best rank at the same step (%)")
    ax.set_title("The rule: gap to the best rank at the same step")
    ax.legend(fontsize=7, loc="upper right")


def _pareto(costs: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (no cheaper-or-equal point with a lower loss), by cost."""
    order = np.lexsort((losses, costs))
    keep, best = [], math.inf
    for i in order:
        if losses[i] < best:
            keep.append(i)
            best = losses[i]
    return np.array(keep, dtype=int)


def loss_vs_cost(trials: pd.DataFrame, rec: Recommendation, out_dir: str) -> dict:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    per_rank = trials.groupby("r")[["trainable_params", "adapter_bytes"]].max() if not trials.empty else pd.DataFrame()
    evidence = [e for e in rec.ranks if e.r in per_rank.index]
    losses = np.array([e.loss for e in evidence])
    for ax, column, label, scale in ((axes[0], "trainable_params", "trainable parameters (log scale)", 1.0),
                                     (axes[1], "adapter_bytes", "adapter size on disk (MB, fp32 safetensors; log scale)", 1e-6)):
        if not evidence:
            ax.set_axis_off()
            continue
        costs = np.array([float(per_rank.loc[e.r, column]) * scale for e in evidence])
        front = _pareto(costs, losses)
        ax.step(costs[front], losses[front], where="post", color=OK_COLOR, lw=1.2, label="Pareto frontier")
        for e, c, loss in zip(evidence, costs, losses):
            ax.scatter(c, loss, s=36, zorder=3, color="#1f77b4", facecolors="none" if e.stopped_early else "#1f77b4")
            note = f"r={e.r}" + (f" (@{e.evidence_step})" if e.stopped_early else "")
            ax.annotate(note, (c, loss), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if rec.rank is not None and rec.rank in per_rank.index:
            ax.scatter([float(per_rank.loc[rec.rank, column]) * scale], [rec.loss], s=220, marker="*", color=HIGHLIGHT,
                       zorder=4, label=f"recommended r={rec.rank}")
        ax.set_xscale("log")
        ax.set_xticks(costs, [_short(c, column) for c in costs])
        ax.minorticks_off()
        ax.set_xlabel(label)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(LOSS_LABEL)
    axes[0].set_title("Eval loss vs trainable parameters")
    axes[1].set_title("Eval loss vs adapter size")
    fig.suptitle("What each rank costs (hollow: judged before max_steps)", fontsize=9)
    return _save(fig, out_dir, "loss_vs_cost")


def _short(value: float, column: str) -> str:
    if column == "adapter_bytes":
        return f"{value:.3g}"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if value >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:g}"


def _rank_colors(ranks) -> dict:
    plt = _plt()
    ranks = sorted(set(int(r) for r in ranks))
    cmap = plt.get_cmap("viridis")
    span = max(1.0, math.log2(max(ranks)) - math.log2(min(ranks))) if ranks else 1.0
    return {r: cmap(0.9 * (math.log2(r) - math.log2(ranks[0])) / span) for r in ranks}


def learning_curves(trials: pd.DataFrame, history: pd.DataFrame, rec: Recommendation, out_dir: str) -> dict:
    plt = _plt()
    fig, (ev, tr) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    if history.empty or trials.empty:
        for ax in (ev, tr):
            ax.set_axis_off()
        return _save(fig, out_dir, "learning_curves")
    colors = _rank_colors(trials["r"])
    styles = ["-", "--", ":", "-."]
    seeds = sorted(set(int(s) for s in trials["seed"]))
    labelled = set()
    for t in trials.sort_values(["r", "seed"]).itertuples():
        h = history[history["trial_id"].astype(str) == str(t.trial_id)].sort_values("step")
        if h.empty:
            continue
        style = styles[seeds.index(int(t.seed)) % len(styles)]
        label = f"r={t.r}" if t.r not in labelled else None
        labelled.add(t.r)
        width = 2.4 if rec.rank == t.r else 1.2
        for ax, column in ((ev, "eval_loss"), (tr, "train_loss")):
            if column not in h:
                continue
            ax.plot(h["step"], h[column], style, marker="o", ms=2.5, color=colors[int(t.r)], lw=width,
                    label=label if ax is ev else None)
            if t.stopped_early or t.status == "error":
                ax.scatter(h["step"].iloc[-1], h[column].iloc[-1], marker="x", color=colors[int(t.r)], s=30, zorder=3)
    for ax, what in ((ev, "Eval loss"), (tr, "Train loss (mean over the steps since the last evaluation)")):
        ax.set_xlabel("optimizer step")
        ax.set_title(what)
    ev.set_ylabel(LOSS_LABEL)
    tr.set_ylabel("train loss (nats/token)")
    ev.legend(fontsize=7, title="rank" + (" (line style: seed)" if len(seeds) > 1 else ""), title_fontsize=7)
    note = f"; thick: recommended r={rec.rank}" if rec.rank is not None else ""
    fig.suptitle(f"Learning curves per rank (x: stopped early or failed{note})", fontsize=9)
    return _save(fig, out_dir, "learning_curves")


def loss_vs_lr(rec: Recommendation, out_dir: str) -> Optional[dict]:
    """Each rank's loss at each learning rate (best so far, seed mean), compared at the last step
    all of that rank's learning rates reached; unstable arms crossed. Drawn when more than one
    learning rate was searched."""
    if len(rec.learning_rates) < 2 or not rec.ranks:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    colors = _rank_colors([e.r for e in rec.ranks])
    for e in rec.ranks:
        arms = [a for a in e.arms if math.isfinite(a.lr)]
        if not arms:
            continue
        ax.plot([a.lr for a in arms], [a.compared_loss for a in arms], "-", color=colors[e.r], lw=2.4 if e.r == rec.rank else 1.1,
                label=f"r={e.r} @ step {arms[0].compared_step} (best lr {format_lr(e.lr)})")
        for a in arms:
            ax.scatter(a.lr, a.compared_loss, color=colors[e.r], marker="x" if a.unstable else "o", s=40 if a.unstable else 18,
                       zorder=3)
    if math.isfinite(rec.base_eval_loss):
        ax.axhline(rec.base_eval_loss, color=MUTED, ls="--", lw=0.8, label="untouched base")
    ax.set_xscale("log")
    ax.set_xticks(rec.learning_rates, [format_lr(v) for v in rec.learning_rates])
    ax.minorticks_off()
    ax.set_xlabel("peak learning rate (log scale)")
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title("Eval loss vs learning rate, per rank, where its rates competed (x: unstable)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, out_dir, "loss_vs_lr")


def effective_rank(table: pd.DataFrame, rec: Recommendation, out_dir: str) -> Optional[dict]:
    if table is None or table.empty or "energy_rank_median" not in table:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    ranks = sorted(set(int(r) for r in table["r"]))
    ax.plot(ranks, ranks, "--", color=MUTED, lw=1, label="r (every direction used)")
    ax.scatter(table["r"], table["energy_rank_median"], color="#1f77b4", s=30, zorder=3,
               label="energy rank: directions holding 90% of ||ΔW||² (median over modules)")
    ax.scatter(table["r"], table["stable_rank_median"], color="#ff7f0e", marker="s", s=24, zorder=3,
               label="stable rank: ||ΔW||²_F / ||ΔW||²_2 (median over modules)")
    if rec.rank is not None:
        ax.axvline(rec.rank, color=HIGHLIGHT, ls=":", lw=1, label=f"recommended r={rec.rank}")
    _rank_axis(ax, ranks)
    ax.set_yscale("log", base=2)
    ax.set_yticks([2**i for i in range(0, int(math.log2(max(ranks))) + 1)])
    ax.get_yaxis().set_major_formatter(_int_formatter())
    ax.minorticks_off()
    ax.set_ylabel("effective rank of ΔW = scale·B·A (directions, log2)")
    ax.set_title("How many directions do the trained adapters use?")
    ax.legend(fontsize=7, loc="upper left")  # every point is on or below the diagonal: upper left stays clear
    return _save(fig, out_dir, "effective_rank")


CHOICE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def cost_by_choice(rec: Recommendation, out_dir: str) -> Optional[dict]:
    """Gain share (or loss) vs trainable parameters: one line per target choice, the Pareto frontier."""
    # gain shares are NaN where the best unit gained nothing over the base (no signal): then the loss
    gain = rec.rule_name == "gain" and any(math.isfinite(e.gain_share) for e in rec.units)
    value = (lambda e: 100 * e.gain_share) if gain else (lambda e: e.loss)
    units = [e for e in rec.units if math.isfinite(e.trainable_params) and e.trainable_params > 0 and math.isfinite(value(e))]
    if not rec.several_choices or not units:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, choice in enumerate(sorted({e.target_choice for e in units})):
        mine = sorted((e for e in units if e.target_choice == choice), key=lambda e: e.trainable_params)
        color = CHOICE_COLORS[i % len(CHOICE_COLORS)]
        ax.plot([e.trainable_params for e in mine], [value(e) for e in mine], "-o", color=color, lw=1, ms=5, label=choice,
                mfc=color)
        for e in mine:
            ax.annotate(f"r={e.r}" + (f" @{e.evidence_step}" if e.stopped_early else ""), (e.trainable_params, value(e)),
                        textcoords="offset points", xytext=(4, 3), fontsize=6, color=color)
    costs = np.array([e.trainable_params for e in units])
    losses = np.array([-value(e) if gain else value(e) for e in units])
    front = _pareto(costs, losses)
    ax.step(costs[front], [value(units[i]) for i in front], where="post", color=MUTED, lw=2, alpha=0.5, label="Pareto frontier")
    if gain:
        ax.axhline(100 * (1 - rec.tolerance), color=OK_COLOR, ls="--", lw=1, label=f"adequate: {1 - rec.tolerance:.0%} of the best gain")
    if rec.rank is not None and math.isfinite(rec.trainable_params):
        chosen = rec.evidence(rec.rank)
        ax.scatter([rec.trainable_params], [value(chosen)], s=240, marker="*", color=HIGHLIGHT, zorder=4,
                   label=f"cheapest adequate: {rec.target_choice} r={rec.rank}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("share of the best gain over the base (%)" if gain else LOSS_LABEL)
    ax.set_title("Which rank on which layers: every adapter by its cost")
    ax.legend(fontsize=7)
    return _save(fig, out_dir, "cost_by_choice")


@dataclass(frozen=True)
class Plot:
    """One figure: its name (the file stem), the report's caption, and how it is drawn from the
    inputs (`PlotInputs`); `draw` returns {'png', 'svg'} paths, or None when the figure does not apply."""

    name: str
    caption: str
    draw: Callable[["PlotInputs"], Optional[dict]]
    every_choice: bool = False  # drawn over every target choice (else over the recommended choice's ranks)


@dataclass(frozen=True)
class PlotInputs:
    trials: pd.DataFrame
    history: pd.DataFrame
    rec: Recommendation
    eff_table: Optional[pd.DataFrame]
    out_dir: str


# Every figure, in the order the report shows them: drawn by `all_plots`, captioned by `analysis.report`.
PLOTS = (
    Plot("cost_by_choice", "Every (target choice, rank) by its cost, with the Pareto frontier",
         lambda d: cost_by_choice(d.rec, d.out_dir) if d.rec.several_choices else None, every_choice=True),
    Plot("loss_vs_rank", "Eval loss vs rank, and the quantity the rule compares",
         lambda d: loss_vs_rank(d.trials, d.history, d.rec, d.out_dir)),
    Plot("loss_vs_lr", "Eval loss vs learning rate, per rank", lambda d: loss_vs_lr(d.rec, d.out_dir)),
    Plot("loss_vs_cost", "Eval loss vs parameter cost, with the Pareto frontier", lambda d: loss_vs_cost(d.trials, d.rec, d.out_dir)),
    Plot("learning_curves", "Learning curves", lambda d: learning_curves(d.trials, d.history, d.rec, d.out_dir)),
    Plot("effective_rank", "Effective rank of the trained adapters", lambda d: effective_rank(d.eff_table, d.rec, d.out_dir)),
)


def plot(name: str) -> Plot:
    """The registered figure of this name; an unregistered one is an error."""
    for p in PLOTS:
        if p.name == name:
            return p
    raise KeyError(f"no plot is registered as {name!r} (registered: {', '.join(p.name for p in PLOTS)})")


def all_plots(trials, history, rec, eff_table, out_dir: str) -> dict:
    """Every registered figure that applies; returns {name: {'png': path, 'svg': path}}. With several
    target choices the per-rank figures show the recommended choice's ranks, and `cost_by_choice` all of them."""
    every = PlotInputs(trials, history, rec, eff_table, out_dir)
    mine = every
    if rec.several_choices:
        import dataclasses

        chosen = trials[CHOICE_KEY].astype(str) == rec.target_choice
        trials, history = trials[chosen], history[history["trial_id"].isin(trials.loc[chosen, "trial_id"])]
        if eff_table is not None and not eff_table.empty and "trial_id" in eff_table:
            eff_table = eff_table[eff_table["trial_id"].isin(trials["trial_id"])]
        if rec.curves is not None:
            rec = dataclasses.replace(rec, curves=rec.curves[rec.curves[CHOICE_KEY] == rec.target_choice])
        mine = PlotInputs(trials, history, rec, eff_table, out_dir)
    out = {}
    for p in PLOTS:
        try:
            figure = p.draw(every if p.every_choice else mine)
        except Exception as exc:  # noqa: BLE001 - one figure that cannot be drawn must not cost the report
            import sys

            import matplotlib.pyplot as plt

            plt.close("all")
            print(f"warning: the figure {p.name} could not be drawn ({type(exc).__name__}: {exc}); "
                  "the report is written without it", file=sys.stderr)
            continue
        if figure:
            out[p.name] = figure
    return out
