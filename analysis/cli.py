"""The analysis subcommands of `lora-rank`: analyze, params, tensorboard, export.

Exit codes as for `search`: 0 success, 2 bad input (named, before any work), 1 no answer
(`analyze` found no finite eval loss; `export` had nothing to export).
"""

from __future__ import annotations

import argparse
import json
import sys

from analysis.selection import DEFAULT_TOLERANCE, check_tolerance


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _analyze(args: argparse.Namespace) -> int:
    from analysis.pipeline import ExperimentNotFound, run_analysis
    from analysis.results import format_table

    try:
        check_tolerance(args.tolerance)
        _check_complete(args)
        result = run_analysis(args.experiment, args.tolerance, args.out)
    except (ValueError, ExperimentNotFound) as exc:
        return _fail(str(exc).replace("tolerance:", "--tolerance:"))
    rec = result.recommendation
    print(format_table(result.trials))
    print()
    if rec.rank is not None:
        print(f"recommended rank: r={rec.rank} (lora_alpha {rec.lora_alpha:g}, targets {','.join(rec.targets)})")
    print(f"  {rec.reason}")
    for finding in result.findings:
        print(f"  - {finding.text}")
    print()
    for kind in ("md", "html", "json", "csv", "parquet"):
        print(f"{kind:>8}: {result.files[kind]}")
    return 0 if rec.rank is not None else 1


def _targets(values: list[str]) -> list:
    """Each --targets value is a preset, or a comma-separated explicit list of layer names."""
    return [v if "," not in v and v in ("attention-qv", "attention", "all-linear") else [s for s in v.split(",") if s] for v in values]


def _params(args: argparse.Namespace) -> int:
    from analysis.params import format_params, parameter_table
    from trainables.model import ModelSourceError

    try:
        rows, facts = parameter_table(args.model, args.ranks, _targets(args.targets), args.trust_remote_code)
    except (ValueError, ModelSourceError) as exc:
        return _fail(str(exc).replace("model.name_or_path:", "MODEL:", 1))  # here the model is an argument
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(f"MODEL: cannot read a model config from {args.model!r} (a local folder with config.json, a config.json "
                     f"file, or a hub id when the hub is reachable): {first}")
    if args.json:
        print(json.dumps({"model": facts, "rows": [{**row.__dict__, "percent_of_base": row.percent_of_base} for row in rows]}, indent=2))
    else:
        print(format_params(rows, facts))
    return 0


def _tensorboard(args: argparse.Namespace) -> int:
    from analysis.pipeline import experiment_path
    from analysis.results import load_experiment
    from analysis.tb import default_logdir, serve, write_logdir

    experiment = experiment_path(args.experiment)
    try:
        trials, history = load_experiment(experiment)
        _warn_incomplete(trials)
        logdir = args.logdir or default_logdir(experiment)
        runs = write_logdir(trials, history, logdir)
    except FileNotFoundError as exc:
        return _fail(f"EXPERIMENT_DIR: {exc}")
    except FileExistsError as exc:
        return _fail(str(exc))
    print(f"wrote {len(runs)} runs (scalars by optimizer step + HParams) to {logdir}")
    if args.no_serve:
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):  # the user asked for it explicitly
        print(f"warning: serving on {args.host}: anyone who can reach this machine can read the experiment", file=sys.stderr)
    serve(logdir, args.host, args.port)
    return 0


def _export(args: argparse.Namespace) -> int:
    from analysis.export import ExportError, export_adapter, stop_note
    from analysis.pipeline import ExperimentNotFound, load

    try:
        check_tolerance(args.tolerance)
        _check_complete(args)
        result = load(args.experiment, args.tolerance)
        info = export_adapter(result.experiment, result.trials, result.history, result.recommendation, args.out, result.config)
    except ExperimentNotFound as exc:
        return _fail(str(exc))
    except ExportError as exc:
        return _fail(str(exc), 1 if str(exc).startswith("nothing to export") else 2)
    except ValueError as exc:
        return _fail(str(exc).replace("tolerance:", "--tolerance:"))
    early = stop_note(info)
    print(f"exported r={info['rank']} (trial {info['trial_dir']}, {info['checkpoint']} at step {info['step']}, "
          f"eval loss {info['eval_loss']:.4f}){early} to {args.out}")
    print(f"load it: PeftModel.from_pretrained(base_model, {args.out!r})")
    return 0


def add_subcommands(sub) -> None:
    """Register analyze, params, tensorboard and export on the `lora-rank` parser."""
    from analysis.tb import DEFAULT_HOST, DEFAULT_PORT

    p = sub.add_parser("analyze", help="recommend a rank from an experiment folder; write tables, plots and a report")
    p.add_argument("experiment", help="the experiment folder (storage_path/name), local or s3://, gs://")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="relative tolerance to the best eval loss (default 0.01 = 1%%)")
    p.add_argument("--out", default=None, help="output folder (default EXPERIMENT/analysis)")
    _add_allow_incomplete(p)
    p.set_defaults(handler=_analyze)

    p = sub.add_parser("params", help="exact LoRA parameter counts and adapter sizes from a model config (no weights)")
    p.add_argument("model", help="local model folder, config.json, builtin:..., or hub id (if the hub is reachable)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="ranks r (default 4 8 16 32 64)")
    p.add_argument("--targets", nargs="+", default=["attention"],
                   help="presets (attention-qv, attention, all-linear) and/or comma-separated layer names, e.g. q_proj,v_proj")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own config code")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_params)

    p = sub.add_parser("tensorboard", help="write a TensorBoard folder (scalars by step + HParams) and serve it on 127.0.0.1")
    p.add_argument("experiment", help="the experiment folder")
    p.add_argument("--logdir", default=None, help="where to write the TensorBoard runs (default EXPERIMENT/tensorboard)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only; use ssh -L to view remotely)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--no-serve", action="store_true", help="only write the folder")
    p.set_defaults(handler=_tensorboard)

    p = sub.add_parser("export", help="copy the recommended trial's adapter (PEFT format) to a folder")
    p.add_argument("experiment", help="the experiment folder")
    p.add_argument("--out", required=True, help="destination folder (new or empty)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="as for analyze (default 0.01)")
    _add_allow_incomplete(p)
    p.set_defaults(handler=_export)


def _add_allow_incomplete(p) -> None:
    p.add_argument("--allow-incomplete", action="store_true",
                   help="recommend even when some trial folders lack their results (they are named as warnings)")


def _check_complete(args: argparse.Namespace) -> None:
    """Refuse (IncompleteExperiment, a ValueError) an experiment with incomplete trial folders,
    unless --allow-incomplete; then name them as warnings."""
    from analysis.pipeline import experiment_path
    from analysis.results import check_complete

    for line in check_complete(experiment_path(args.experiment), args.allow_incomplete):
        print(f"warning: EXPERIMENT_DIR: incomplete trial folder {line}", file=sys.stderr)


def _warn_incomplete(trials) -> None:
    from analysis.results import incomplete_trials

    for line in incomplete_trials(trials):
        print(f"warning: EXPERIMENT_DIR: incomplete trial folder {line}", file=sys.stderr)
