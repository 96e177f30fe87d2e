"""The analysis subcommands of `lora-rank`: analyze, tensorboard, export.

Exit codes as for `search`: 0 success, 2 bad input (named, before any work), 1 no answer
(`analyze` found no finite eval loss; `export` had nothing to export). The `params` calculator
needs the model code, so `search.cli` registers it.
"""

from __future__ import annotations

import argparse
import os
import sys

from lora_rank_search.analysis.selection import DEFAULT_RULE, RULES, check_rule, check_tolerance


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _analyze(args: argparse.Namespace) -> int:
    from lora_rank_search.analysis.pipeline import ExperimentNotFound, run_analysis
    from lora_rank_search.analysis.results import format_table

    try:
        _check_rule_args(args)
        _check_complete(args)
        result = run_analysis(args.experiment, args.tolerance, args.out, args.rule)
    except (ValueError, ExperimentNotFound) as exc:
        return _fail(_flag_names(exc))
    print(format_table(result.trials))
    print()
    print(verdict_lines(result, details=True))
    print()
    for kind in ("md", "html", "json", "csv", "parquet"):
        print(f"{kind:>8}: {result.files[kind]}")
    return 0 if result.recommendation.rank is not None else 1


def _check_rule_args(args: argparse.Namespace) -> None:
    check_rule(args.rule)
    if args.tolerance is not None:
        check_tolerance(args.tolerance, args.rule)


def _flag_names(exc: Exception) -> str:
    return str(exc).replace("tolerance:", "--tolerance:", 1).replace("rule:", "--rule:", 1)


def verdict_lines(result, details: bool = False) -> str:
    """The verdict in three lines (rank, learning rate, targets, gain share; why; the report), plus
    every diagnosis with details."""
    from lora_rank_search.contract.arms import format_lr
    from lora_rank_search.contract.config import describe_targets

    rec = result.recommendation
    lines = []
    if rec.rank is not None:
        lr = f"learning rate {format_lr(rec.learning_rate)}" if rec.learning_rate == rec.learning_rate else "learning rate ?"
        share = f", {rec.gain_share:.1%} of the best gain" if rec.gain_share == rec.gain_share else ""
        if rec.several_choices:
            cost = f"{rec.trainable_params:,.0f} trainable params" if rec.trainable_params == rec.trainable_params else "cost ?"
            lines.append(f"recommended (cheapest adequate adapter): {rec.target_choice} r={rec.rank}, {lr}, lora_alpha "
                         f"{rec.lora_alpha:g}, targets {describe_targets(rec.targets)}, {cost}{share}")
        else:
            lines.append(f"recommended: r={rec.rank}, {lr}, lora_alpha {rec.lora_alpha:g}, targets {describe_targets(rec.targets)}{share}")
    else:
        lines.append("no recommendation")
    lines.append(f"  {rec.reason}")
    from lora_rank_search.analysis.confirmations import summary

    confirmed = summary(rec)
    if confirmed:
        lines.append(f"  {confirmed}")
    if details:
        lines += [f"  - {finding.text}" for finding in result.findings]
    if result.files.get("md"):
        lines.append(f"  report: {result.files['md']}")
    return "\n".join(lines)


def _tensorboard(args: argparse.Namespace) -> int:
    from lora_rank_search.analysis.pipeline import experiment_path
    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.analysis.tb import default_logdir, serve, write_logdir

    experiment = experiment_path(args.experiment)
    try:
        trials, history = load_experiment(experiment)
    except FileNotFoundError as exc:
        return _fail(f"EXPERIMENT_DIR: {exc}")
    _warn_incomplete(trials)
    logdir = args.logdir or default_logdir(experiment)
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        return _fail(f"--logdir: {logdir!r} is a file; give a folder")
    try:
        runs = write_logdir(trials, history, logdir)
    except FileExistsError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"--logdir: cannot write {logdir!r} ({exc.strerror or type(exc).__name__})")
    print(f"wrote {len(runs)} runs (scalars by optimizer step + HParams) to {logdir}")
    if args.no_serve:
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):  # the user asked for it explicitly
        print(f"warning: serving on {args.host}: anyone who can reach this machine can read the experiment", file=sys.stderr)
    serve(logdir, args.host, args.port)
    return 0


def _export(args: argparse.Namespace) -> int:
    from lora_rank_search.analysis.export import ExportError, export_adapter, stop_note
    from lora_rank_search.analysis.pipeline import ExperimentNotFound, load
    from lora_rank_search.contract.arms import format_lr

    try:
        _check_rule_args(args)
        _check_complete(args)
        result = load(args.experiment, args.tolerance, args.rule)
        info = export_adapter(result.experiment, result.trials, result.history, result.recommendation, args.out, result.config,
                              force=args.force)
    except ExperimentNotFound as exc:
        return _fail(str(exc))
    except ExportError as exc:
        return _fail(str(exc), 1 if str(exc).startswith("nothing to export") else 2)
    except ValueError as exc:
        return _fail(_flag_names(exc))
    early = stop_note(info)
    rec = result.recommendation
    print(f"exported {rec.unit_name(rec.target_choice, info['rank'])} lr={format_lr(rec.learning_rate)} (trial {info['trial_dir']}, "
          f"{info['checkpoint']} at step {info['step']}, "
          f"eval loss {info['eval_loss']:.4f}){early} to {args.out}")
    print(f"base model in adapter_config.json: {info['base_model_name_or_path']}"
          + (f" ({info['base_model_note']})" if info["base_model_note"] else ""))
    print(f"load it: AutoPeftModelForCausalLM.from_pretrained({args.out!r}), or PeftModel.from_pretrained(base_model, {args.out!r})")
    return 0


def _rule_args(p) -> None:
    defaults = ", ".join(f"{rule} {tol:g}" for rule, tol in RULES.items())
    p.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES),
                   help="adequacy rule: gain (share of the best rank's gain over the untouched base, the default), "
                        "relative (to the best loss) or absolute (nats/token)")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"the rule's tolerance (defaults: {defaults}; gain 0.05 = at least 95%% of the best gain)")


def add_subcommands(sub) -> None:
    """Register analyze, tensorboard and export on the `lora-rank` parser."""
    from lora_rank_search.analysis.tb import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("analyze", help="recommend a rank from an experiment folder; write tables, plots and a report")
    p.add_argument("experiment", help="the experiment folder (storage_path/name), local or s3://, gs://")
    _rule_args(p)
    p.add_argument("--out", default=None, help="output folder (default EXPERIMENT/analysis)")
    _add_allow_incomplete(p)
    p.set_defaults(handler=_analyze)

    p = sub.add_parser("tensorboard", help="write a TensorBoard folder (scalars by step + HParams) and serve it on 127.0.0.1")
    p.add_argument("experiment", help="the experiment folder")
    p.add_argument("--logdir", default=None, help="where to write the TensorBoard runs (default EXPERIMENT/tensorboard)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only; use ssh -L to view remotely)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--no-serve", action="store_true", help="only write the folder")
    p.set_defaults(handler=_tensorboard)

    p = sub.add_parser("export", help="copy the recommended trial's adapter (PEFT format) to a folder")
    p.add_argument("experiment", help="the experiment folder")
    p.add_argument("--out", required=True, help="destination folder (new or empty, or an earlier export with --force)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    _rule_args(p)
    _add_allow_incomplete(p)
    p.set_defaults(handler=_export)


def _add_allow_incomplete(p) -> None:
    p.add_argument("--allow-incomplete", action="store_true",
                   help="recommend even when some trial folders lack their results (they are named as warnings)")


def _check_complete(args: argparse.Namespace) -> None:
    """Refuse (IncompleteExperiment, a ValueError) an experiment with incomplete trial folders,
    unless --allow-incomplete; then name them as warnings."""
    from lora_rank_search.analysis.pipeline import experiment_path
    from lora_rank_search.analysis.results import check_complete

    for line in check_complete(experiment_path(args.experiment), args.allow_incomplete):
        print(f"warning: EXPERIMENT_DIR: incomplete trial folder {line}", file=sys.stderr)


def _warn_incomplete(trials) -> None:
    from lora_rank_search.analysis.results import incomplete_trials

    for line in incomplete_trials(trials):
        print(f"warning: EXPERIMENT_DIR: incomplete trial folder {line}", file=sys.stderr)
