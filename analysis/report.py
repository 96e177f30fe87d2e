"""Write the analysis: results.csv/.parquet, recommendation.json, REPORT.md and a self-contained
report.html (the same content; figures inlined as SVG), from one list of content blocks."""

from __future__ import annotations

import html
import json
import os
import time
from typing import Optional

import pandas as pd

from lora_rank_search.analysis.diagnosis import Finding
from lora_rank_search.analysis.plots import PLOTS, plot
from lora_rank_search.analysis.results import format_table, incomplete_trials
from lora_rank_search.analysis.selection import Recommendation
from lora_rank_search.contract.arms import CHOICE_KEY, LR_KEY, RANK_KEY, describe_nuisance, format_lr, with_arm
from lora_rank_search.contract.layout import read_meta
from lora_rank_search.contract.recommendation import json_safe
from lora_rank_search.contract.recommendation import problems as recommendation_problems

RESULTS_CSV, RESULTS_PARQUET = "results.csv", "results.parquet"
RECOMMENDATION_JSON, REPORT_MD, REPORT_HTML = "recommendation.json", "REPORT.md", "report.html"
PLOTS_DIR = "plots"


def _target_lines(targets, r: int, alpha: Optional[float]) -> list[str]:
    """LoraConfig's target arguments: target_modules, and for MoE expert / router weights
    target_parameters, with the fused ones at PEFT's rank and alpha multiple (as the trial set them)."""
    from lora_rank_search.contract.config import fused_patterns, split_targets

    modules, params = split_targets(list(targets))
    lines = [f"    target_modules={json.dumps(modules)},"]
    if params:
        lines.append(f"    target_parameters={json.dumps(params)},  # MoE expert / router weights, adapted as parameters")
        fused = fused_patterns(params)
        if fused:
            lines.append(f"    rank_pattern={json.dumps({k: r * m for k, m in fused.items()})},  # fused expert weights: 2r")
            if alpha is not None:
                lines.append(f"    alpha_pattern={json.dumps({k: alpha * m for k, m in fused.items()})},")
    return lines


def lora_config_snippet(rec: Recommendation, dropout: Optional[float]) -> str:
    """Ready-to-paste `peft.LoraConfig(...)` for the recommended rank, as the search trained it."""
    if rec.rank is None:
        return ""
    rslora = rec.alpha_rule == "rslora"
    alpha = rec.lora_alpha if rec.lora_alpha == rec.lora_alpha else None  # NaN -> unknown
    alpha_text = f"{alpha:g}" if alpha is not None else "?"
    scale = f"alpha/sqrt(r) = {alpha / rec.rank ** 0.5:.3g}" if rslora and alpha else (f"alpha/r = {alpha / rec.rank:g}" if alpha else "")
    lines = [
        "from peft import LoraConfig",
        "",
        *([f"# the cheapest adequate adapter: target choice {rec.target_choice}, {rec.trainable_params:,.0f} trainable params"]
          if rec.several_choices else []),
        "lora_config = LoraConfig(",
        f"    r={rec.rank},",
        f"    lora_alpha={alpha_text},  # alpha rule {rec.alpha_rule or '?'}: scale {scale}, as in the search",
    ]
    if rslora:
        lines.append("    use_rslora=True,")
    lines += [
        f"    lora_dropout={dropout if dropout is not None else 0.05:g},",
        *_target_lines(rec.targets, rec.rank, alpha),
        '    bias="none",',
        '    task_type="CAUSAL_LM",',
        ")",
    ]
    if rec.learning_rate == rec.learning_rate:
        lines.append(f"# trained at peak learning rate {format_lr(rec.learning_rate)} (this rank's best in the search)")
    return "\n".join(lines)


def results_frame(trials: pd.DataFrame, rec: Recommendation, eff: Optional[pd.DataFrame]) -> pd.DataFrame:
    """The per-trial table plus how each rank was judged and its adapter's effective rank."""
    out = trials.copy()
    judged = {(e.target_choice, e.r): e for e in rec.units}
    units = list(zip(out[CHOICE_KEY].fillna("").astype(str) if CHOICE_KEY in out else [""] * len(out), out[RANK_KEY]))
    out["judged_at_step"] = [judged[u].evidence_step if u in judged else None for u in units]
    out["rank_gap_to_best"] = [judged[u].gap if u in judged else None for u in units]
    out["rank_gain_share"] = [judged[u].gain_share if u in judged else None for u in units]
    out["rank_best_lr"] = [judged[u].lr if u in judged else None for u in units]
    out["rank_base_eval_loss"] = rec.base_eval_loss
    out["rank_adequate"] = [bool(judged[u].adequate) if u in judged else False for u in units]
    out["recommended_rank"] = [u == (rec.target_choice, rec.rank) for u in units]
    out["recommended_arm"] = out["recommended_rank"]
    for key, value in rec.nuisance.items():  # the recommended unit's best arm: its learning rate (and any further nuisance)
        if key in out:
            out["recommended_arm"] &= out[key] == value
    out["exported_trial"] = out["trial_id"].astype(str) == str(rec.trial_id)
    if eff is not None and not eff.empty:
        keep = ["trial_id", "checkpoint", "energy_rank_median", "stable_rank_median", "energy_rank_max"]
        out = out.merge(eff[keep].rename(columns={"checkpoint": "best_checkpoint"}), on="trial_id", how="left")
    return out


def _best_arm(rec: Recommendation, nuisance: dict) -> str:
    """An arm's searched nuisance values: '3e-4' with learning rates alone, else 'lr 3e-4, dropout 0.1'."""
    if rec.searched == [LR_KEY]:
        return format_lr(nuisance.get(LR_KEY))
    return describe_nuisance({k: v for k, v in nuisance.items() if k in rec.searched})


def _evidence_rows(rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    several = bool(rec.searched)
    best = "best lr" if rec.searched == [LR_KEY] else "best arm"
    headers = ["r", "seeds", "judged at step", "eval loss"] + ([best] if several else []) + [
        "best rank there", "its loss", "share of its gain" if rec.rule_name == "gain" else "gap", "adequate"]
    rows = []
    for e in rec.ranks:
        loss = f"{e.loss:.4f}" + (f" ± {e.se:.4f}" if len(e.seeds) > 1 else "")
        mark = "**yes (recommended)**" if e.r == rec.rank else ("yes" if e.adequate else "no")
        if e.overtaken_by:
            mark = f"no: not established ({e.overtaken_by} was as good here, then fell short)"
        if e.unstable:
            mark += " (unstable)"
        # an unstable rank's best arm may have ended on a diverged loss, not by the scheduler's stop
        step = f"{e.evidence_step}" + ((" (ended early)" if e.unstable else " (stopped early)") if e.stopped_early else "")
        lr = [_best_arm(rec, e.nuisance) + "".join(f"; {_best_arm(rec, a.nuisance)} unstable" if rec.searched != [LR_KEY] else
                                                   f", {_best_arm(rec, a.nuisance)} unstable"
                                                   for a in e.arms if a.unstable and a.nuisance != e.nuisance)] if several else []
        measure = f"{e.gain_share:.1%}" if rec.rule_name == "gain" else f"{e.gap:+.2%}"
        rows.append([str(e.r), str(len(e.seeds)), step, loss, *lr, rec.unit_name(e.ref_choice, e.ref_rank), f"{e.ref_loss:.4f}",
                     measure, mark])
    return headers, rows


def _choice_rows(rec: Recommendation, trials: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Every (target choice, rank): its targets, trainable parameters, share of the best gain, verdict."""
    measure = "share of the best gain" if rec.rule_name == "gain" else "gap"
    headers = ["target choice", "targets", "r", "trainable params", measure, "judged at step", "adequate"]
    targets = {}
    if "target_choice" in trials and "targets" in trials:
        targets = dict(zip(trials["target_choice"].astype(str), trials["targets"].astype(str)))
    smallest = {v.target_choice: v.rank for v in rec.choices}
    rows = []
    for e in sorted(rec.units, key=lambda e: (e.trainable_params if e.trainable_params == e.trainable_params else float("inf"), e.r)):
        mark = "yes" if e.adequate else (f"no: not established ({e.overtaken_by} was as good here, then fell short)"
                                         if e.overtaken_by else "no")
        if (e.target_choice, e.r) == (rec.target_choice, rec.rank):
            mark = "**yes (cheapest: recommended)**"
        elif smallest.get(e.target_choice) == e.r:
            mark = "yes (smallest adequate rank of its choice)"
        params = f"{e.trainable_params:,.0f}" if e.trainable_params == e.trainable_params else "?"
        shown = f"{e.gain_share:.1%}" if rec.rule_name == "gain" else f"{e.gap:+.2%}"
        rows.append([e.target_choice, targets.get(e.target_choice, "?").replace(",", ", "), str(e.r), params, shown,
                     str(e.evidence_step), mark])
    return headers, rows


def _lr_rows(rec: Recommendation) -> tuple[list[str], list[list[str]]]:
    """Loss per rank (rows) and arm (columns: learning rate, and any further nuisance searched), at
    the last step all of the rank's arms reached (where they competed)."""
    def key(nuisance: dict) -> tuple:
        return tuple(nuisance.get(k) for k in rec.searched)

    columns = sorted({key(a.nuisance) for e in rec.ranks for a in e.arms}, key=lambda t: tuple(-1e300 if v is None else v for v in t))
    headers = ["r"] + [_best_arm(rec, dict(zip(rec.searched, c))) for c in columns]
    rows = []
    for e in rec.ranks:
        cells = []
        for column in columns:
            arm = next((a for a in e.arms if key(a.nuisance) == column), None)
            if arm is None:
                cells.append("-")
                continue
            text = f"{arm.compared_loss:.4f} @{arm.compared_step}" + (" unstable" if arm.unstable else "")
            cells.append(f"**{text}**" if column == key(e.nuisance) else text)
        rows.append([str(e.r), *cells])
    return headers, rows


def _tolerance_text(rec: Recommendation) -> str:
    if rec.rule_name == "gain":
        return (f"Rule `gain`: a rank is adequate when it recovers at least {1 - rec.tolerance:.0%} of the best rank's gain over "
                f"the untouched base (eval loss {rec.base_eval_loss:.4f}), compared at the same step.")
    if rec.rule_name == "relative":
        return f"Rule `relative`: tolerance {rec.tolerance:.2%} of the best eval loss at the same step."
    return f"Rule `absolute`: tolerance {rec.tolerance:g} nats/token above the best eval loss at the same step."


def _effective_rows(eff: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    headers = ["r", "seed", "checkpoint step", "eval loss", "energy rank (90%)", "stable rank", "modules"]
    rows = [[str(t.r), str(t.seed), str(t.step), f"{t.eval_loss:.4f}", f"{t.energy_rank_median:g} ({t.energy_rank_max})",
             f"{t.stable_rank_median:.2f} ({t.stable_rank_max:.2f})", str(t.modules)] for t in eff.sort_values(["r", "seed"]).itertuples()]
    return headers, rows


def export_command(experiment: str, rec: Recommendation) -> str:
    """The `lora-rank export` command that writes this recommendation's adapter: the experiment
    quoted for a shell, and the rule and tolerance when they are not export's defaults (a report
    from `analyze --rule absolute` named a command that exported another rank)."""
    import shlex

    from lora_rank_search.analysis.selection import DEFAULT_RULE, RULES

    rule = []
    if rec.rule_name != DEFAULT_RULE or abs(rec.tolerance - RULES[DEFAULT_RULE]) > 1e-12:
        rule = ["--rule", rec.rule_name, "--tolerance", f"{rec.tolerance:g}"]
    return shlex.join(["lora-rank", "export", experiment, *rule, "--out", "DIR"])


def build_blocks(experiment: str, trials: pd.DataFrame, rec: Recommendation, findings: list[Finding],
                 eff_sentence: str, eff: Optional[pd.DataFrame], plots: dict, snippet: str, config: dict) -> list[tuple]:
    """The report as (kind, payload) blocks: h1/h2/p/list/code/table/figure."""
    model = (config.get("model") or {}).get("name_or_path", "?")
    blocks: list[tuple] = [("h1", f"LoRA rank search: {os.path.basename(experiment.rstrip('/'))}")]
    blocks.append(("p", f"Experiment `{experiment}` · model `{model}` · {len(trials)} trials · analysed {time.strftime('%Y-%m-%d %H:%M')}"))
    if rec.rank is not None:
        lr = f", learning rate {format_lr(rec.learning_rate)}" if rec.learning_rate == rec.learning_rate else ""
        what = f"{rec.target_choice}, r = {rec.rank}" if rec.several_choices else f"r = {rec.rank}"
        blocks.append(("h2", f"Recommendation: {what}{lr}"))
        blocks.append(("p", f"{rec.reason}. {_tolerance_text(rec)}"))
        if rec.close:
            blocks.append(("p", "Close calls (cheaper, just short of the rule at this budget):"))
            blocks.append(("list", rec.close))
    else:
        blocks.append(("h2", "No recommendation"))
        blocks.append(("p", rec.reason + "."))
    if rec.quantity != "eval_loss":
        metric = rec.quantity.split(":", 1)[1]
        sign = "−" if rec.metric_mode == "max" else ""
        blocks.append(("p", f"**Judged by the downstream metric `{metric}` ({rec.metric_mode} is better), not the eval loss.** "
                            f"Untouched base model (step 0): {metric} {rec.base_eval_metric:.4f}, eval loss "
                            f"{rec.base_eval_loss_measured:.4f}"
                            + (f"; the recommended adapter: {metric} {rec.eval_metric:.4f}. " if rec.rank is not None else ". ")
                            + f"In the tables below the 'loss' columns hold {sign}{metric}; the eval loss stays in the table of all trials."))
        if rec.metric_errors:
            blocks.append(("p", "The metric failed:"))
            blocks.append(("list", list(rec.metric_errors)))
    elif rec.base_eval_loss == rec.base_eval_loss:
        blocks.append(("p", f"Untouched base model (every trial's step-0 evaluation): eval loss {rec.base_eval_loss:.4f}."))
    damaged = incomplete_trials(trials)
    if damaged:
        blocks.append(("h2", "Damaged trial folders (left out of the evidence)"))
        blocks.append(("p", "Their files are missing, damaged or contradict each other; the verdict was taken without them "
                            "(--allow-incomplete). Restore them (sync the experiment again) and analyze again."))
        blocks.append(("list", damaged))
    blocks.append(("p", f"**Rule:** {rec.rule}."))
    if rec.knee is not None:
        blocks.append(("p", f"Knee of the gap-vs-log2(r) curve (an estimate, not used by the rule): r = {rec.knee}."))
    shown = [f.text for f in findings if f.kind != "effective-rank"]  # that one has its own section below
    if shown:
        blocks.append(("h2", "Diagnosis"))
        blocks.append(("list", shown))
    if snippet:
        blocks.append(("h2", "Use it"))
        blocks.append(("code", snippet))
        blocks.append(("p", f"`{export_command(experiment, rec)}` writes that trial's trained adapter (PEFT format)."))
    if rec.several_choices:
        blocks.append(("h2", "Target choices: every adapter by its cost"))
        blocks.append(("p", "Each (target choice, rank) is judged against the best adapter of any choice at the same step; "
                            "the verdict is the adequate one with the fewest trainable parameters. Per choice: "
                            + "; ".join(f"{v.target_choice}: " + (f"smallest adequate rank {v.rank}" if v.rank is not None
                                        else "no adequate rank") for v in rec.choices) + "."))
        blocks.append(("table", _choice_rows(rec, trials)))
    if rec.ranks:
        blocks.append(("h2", "Evidence per rank" + (f" ({rec.target_choice})" if rec.several_choices else "")))
        blocks.append(("p", "Each rank is judged at the last step it reached, against the best rank at that same step "
                            "(loss = each trial's best eval loss so far, mean ± standard error over seeds, at the rank's best "
                            "learning rate)."))
        blocks.append(("table", _evidence_rows(rec)))
        if rec.searched:
            blocks.append(("h2", "Learning rates" if rec.searched == [LR_KEY] else "Arms (" + ", ".join(rec.searched) + ")"))
            blocks.append(("p", "Eval loss (best so far, seed mean) of every rank at every learning rate, at the last step all of "
                                "the rank's rates reached (@step: where successive halving chose between them). Bold: the rate "
                                "the rank is judged at. Unstable: ended worse than the untouched base."))
            blocks.append(("table", _lr_rows(rec)))
    for name in plots:
        plot(name)  # a figure drawn but not registered is an error, not a figure the report leaves out
    for registered in PLOTS:  # in the registry's order, with its caption
        if registered.name in plots:
            blocks.append(("figure", (registered.caption, plots[registered.name])))
    if eff is not None and not eff.empty:
        blocks.append(("h2", "Effective rank of the trained adapters"))
        blocks.append(("p", eff_sentence + " Per trial, its best checkpoint; median (max) over the adapted modules."))
        blocks.append(("table", _effective_rows(eff)))
    blocks.append(("h2", "All trials"))
    blocks.append(("code", format_table(trials) if not trials.empty else "(no trials)"))
    return blocks


def budget_blocks(budget: Optional[dict]) -> list[tuple]:
    """The report's last section: the budget against the probe's estimate and what was spent
    (search_meta.json's `budget`, written by search.runner); [] for a search without a budget."""
    if not budget:
        return []
    limits, est, spent = budget.get("limits") or {}, budget.get("estimate") or {}, budget.get("spent") or {}
    rows = []
    for key, label, unit in (("gpu_hours", "GPU-hours", "{:.3g}"), ("cpu_hours", "CPU-hours", "{:.3g}"),
                             ("wall_minutes", "wall minutes", "{:.1f}")):
        if limits.get(key) is None:
            continue
        spent_value = spent.get(key) if key != "wall_minutes" else (spent.get("wall_seconds", float("nan")) / 60.0 if spent else None)
        shown = (lambda v: "?" if v is None else unit.format(v))
        within = "" if spent_value is None else ("yes" if spent_value <= limits[key] else "no")
        rows.append([label, f"{limits[key]:g}", shown(est.get(key)), shown(spent_value), within])
    out = [("h2", "Budget")]
    probe = budget.get("probe") or {}
    lines = []
    if probe:
        lines.append(f"Probe before training: {probe.get('step_s', float('nan')):.3g} s per optimizer step, "
                     f"{probe.get('eval_s', float('nan')):.3g} s per evaluation, {probe.get('load_s', float('nan')):.3g} s to load "
                     f"(on {probe.get('device', '?')}).")
    if budget.get("configured_max_steps") and budget.get("max_steps") != budget.get("configured_max_steps"):
        lines.append(f"budget.fit: shrink lowered train.max_steps from {budget['configured_max_steps']} to {budget['max_steps']} "
                     "to fit the budget.")
    if not spent:
        lines.append("Nothing spent recorded yet (the search did not finish).")
    else:
        lines.append("Spent: wall clock from the command's start to the end of the search (the analysis after it not "
                     f"included); {spent.get('trial_seconds', 0):.0f} trial-seconds.")
    out.append(("p", " ".join(lines)))
    if rows:
        out.append(("table", (["limit", "budget", "estimated", "spent", "within"], rows)))
    return out


def render_markdown(blocks: list[tuple], out_dir: str) -> str:
    parts = []
    for kind, payload in blocks:
        if kind == "h1":
            parts.append(f"# {payload}")
        elif kind == "h2":
            parts.append(f"## {payload}")
        elif kind == "p":
            parts.append(payload)
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in payload))
        elif kind == "code":
            parts.append(f"```\n{payload}\n```" if not payload.startswith("from peft") else f"```python\n{payload}\n```")
        elif kind == "table":
            headers, rows = payload
            lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(r) + " |" for r in rows]
            parts.append("\n".join(lines))
        elif kind == "figure":
            caption, paths = payload
            parts.append(f"![{caption}]({os.path.relpath(paths['png'], out_dir)})")
    return "\n\n".join(parts) + "\n"


def _inline(text: str) -> str:
    """Escape, then the two inline marks the blocks use: `code` and **bold**."""
    import re

    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _svg_inline(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        svg = handle.read()
    return svg[svg.index("<svg"):]  # drop the XML prolog and doctype


def render_html(blocks: list[tuple]) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "pre{background:#f6f8fa;padding:10px;overflow-x:auto}figure{margin:1em 0}svg{max-width:100%;height:auto}"
             "figcaption{color:#555;font-size:90%}")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">']
    title = next((p for k, p in blocks if k == "h1"), "LoRA rank search")
    parts.append(f"<title>{html.escape(title)}</title><style>{style}</style></head><body>")
    for kind, payload in blocks:
        if kind in ("h1", "h2"):
            parts.append(f"<{kind}>{_inline(payload)}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_inline(payload)}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in payload) + "</ul>")
        elif kind == "code":
            parts.append(f"<pre><code>{html.escape(payload)}</code></pre>")
        elif kind == "table":
            headers, rows = payload
            head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            caption, paths = payload
            parts.append(f"<figure>{_svg_inline(paths['svg'])}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(out_dir: str, experiment: str, trials: pd.DataFrame, rec: Recommendation, findings: list[Finding],
                  eff: Optional[pd.DataFrame], eff_sentence: str, plots: dict, config: dict) -> dict:
    """Write every file; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    dropout = (with_arm(config, rec.nuisance).get("lora") or {}).get("dropout")  # the recommended arm's
    if rec.rank is None or isinstance(dropout, (list, tuple)):  # no arm recommended: the config's list is no arm's value
        dropout = None
    snippet = lora_config_snippet(rec, dropout)
    frame = results_frame(trials, rec, eff)
    paths = {"csv": os.path.join(out_dir, RESULTS_CSV), "parquet": os.path.join(out_dir, RESULTS_PARQUET),
             "json": os.path.join(out_dir, RECOMMENDATION_JSON), "md": os.path.join(out_dir, REPORT_MD),
             "html": os.path.join(out_dir, REPORT_HTML)}
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"], index=False)
    payload = {"experiment": experiment, **rec.to_dict(), "lora_dropout": dropout, "rule_name": rec.rule_name,
               "lora_config": snippet, "damaged_trials": incomplete_trials(trials), "diagnosis": [{"kind": f.kind, "text": f.text} for f in findings]}
    broken = recommendation_problems(json_safe(payload))
    if broken:  # the file is a contract (contract.recommendation): a field it does not declare is a bug here
        raise ValueError("recommendation.json would break its contract: " + "; ".join(broken))
    with open(paths["json"], "w") as handle:
        json.dump(json_safe(payload), handle, indent=2)
    blocks = build_blocks(experiment, trials, rec, findings, eff_sentence, eff, plots, snippet, config)
    blocks += budget_blocks(read_meta(experiment).get("budget"))
    with open(paths["md"], "w") as handle:
        handle.write(render_markdown(blocks, out_dir))
    with open(paths["html"], "w") as handle:
        handle.write(render_html(blocks))
    return paths
