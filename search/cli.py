"""The `lora-rank` command line: search, and the analysis subcommands registered by `analysis.cli`.

Exit codes: 0 success, 2 bad input (config, model, data, storage: found before any expensive
work), 1 a failure during the search, 130 interrupted (resume with --resume).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Callable, Optional

from lora_rank_search.search.config import ConfigError, load_config

Handler = Callable[[argparse.Namespace], int]


def _search(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    from lora_rank_search.search.runner import run_search

    again = resume_command(args)
    try:
        experiment = run_search(cfg, resume=args.resume, address=args.address)
    except KeyboardInterrupt:
        print(_interrupted_message(cfg, args, again), file=sys.stderr)
        return 130
    from lora_rank_search.analysis.results import DONE, format_failures, format_table, load_experiment
    from lora_rank_search.contract.layout import read_meta
    from lora_rank_search.search.space import num_trials

    trials, _ = load_experiment(experiment)
    planned = int(read_meta(experiment).get("num_trials") or num_trials(cfg))  # duplicate target choices merged
    print()
    print(format_table(trials))
    failures = format_failures(trials)
    if failures:
        print(f"\nfailed trials (the others are unaffected):\n{failures}")
    print(f"\nexperiment: {experiment}")
    # Tune catches the first Ctrl-C itself, saves its state and returns as if done: count what finished.
    unfinished = planned - (int(trials["status"].isin(DONE).sum()) if not trials.empty else 0)  # < 0: more folders than arms
    if unfinished and args.resume and not trials.empty and len(trials) != planned:
        print(f"error: name: the experiment {experiment!r} holds {len(trials)} trials but the config asks for {planned}; "
              "resuming cannot finish it (was its stored config changed or lost?): start a new search under another name",
              file=sys.stderr)
        return 2
    if unfinished > 0:
        print(f"\ninterrupted with {unfinished} trial(s) unfinished; nothing finished is lost. Continue with:\n  {again}", file=sys.stderr)
        return 130
    errored = _trials_in_error(trials)
    from lora_rank_search.analysis.results import incomplete_trials

    damaged = incomplete_trials(trials)
    if damaged:
        for line in damaged:
            print(f"warning: EXPERIMENT_DIR: incomplete trial folder {line}", file=sys.stderr)
        print(f"error: EXPERIMENT_DIR: {len(damaged)} trial folder(s) of {experiment!r} are incomplete or damaged, so no verdict "
              f"is given; restore them, or run: lora-rank analyze {shlex.quote(experiment)} --allow-incomplete", file=sys.stderr)
        return 2
    if args.no_analyze:
        print(f"next: lora-rank analyze {shlex.quote(experiment)}")
        return 1 if errored else 0
    from lora_rank_search.analysis.cli import verdict_lines
    from lora_rank_search.analysis.pipeline import run_analysis

    try:
        result = run_analysis(experiment)  # into EXPERIMENT/analysis (a remote experiment: ./analysis-NAME)
    except Exception as exc:  # noqa: BLE001 - the search itself is done and saved: never lose it to a report
        print(f"\nwarning: the analysis failed ({type(exc).__name__}: {exc}); the experiment is complete. "
              f"Run it again with:\n  lora-rank analyze {shlex.quote(experiment)}", file=sys.stderr)
        return 1 if errored else 0
    print()
    print(verdict_lines(result))
    from lora_rank_search.contract import layout
    from lora_rank_search.search import tracking

    tracking.log_verdict(layout.read_meta(experiment).get("tracking"), result.recommendation)
    if errored:
        return 1
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="run (or resume) a rank search from a YAML config")
    p.add_argument("config", help="path to the search config (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.SUB=VALUE", help="override a config value (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the experiment storage_path/name after an interruption")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: start Ray locally")
    p.add_argument("--no-analyze", action="store_true",
                   help="skip the analysis at the end (run `lora-rank analyze EXPERIMENT` later)")
    p.set_defaults(handler=_search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-rank", description="Measure which LoRA rank to use.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_search(sub)
    from lora_rank_search.analysis.cli import add_subcommands

    add_subcommands(sub)
    _add_params(sub)
    return parser


def _add_params(sub) -> None:
    p = sub.add_parser("params", help="exact LoRA parameter counts and adapter sizes from a model config (no weights)")
    p.add_argument("model", help="local model folder, config.json, builtin:..., or hub id (if the hub is reachable)")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64], help="ranks r (default 4 8 16 32 64)")
    p.add_argument("--targets", nargs="+", default=["attention"],
                   help="presets (attention-qv, attention, mlp, experts, all-linear) and/or comma-separated layer names "
                        "matched as PEFT does, e.g. q_proj,v_proj or attn.c_proj")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model repo's own config code")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=_params)


def _params_fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _targets(values: list[str]) -> list:
    """Each --targets value is a preset, or a comma-separated explicit list of layer names."""
    from lora_rank_search.trainables.lora import PRESETS

    return [v if "," not in v and v in PRESETS else [s for s in v.split(",") if s] for v in values]


def _params(args: argparse.Namespace) -> int:
    from lora_rank_search.trainables.params import format_params, parameter_table
    from lora_rank_search.trainables.model import ModelSourceError

    try:
        rows, facts = parameter_table(args.model, args.ranks, _targets(args.targets), args.trust_remote_code)
    except (ValueError, ModelSourceError) as exc:
        return _params_fail(str(exc).replace("model.name_or_path:", "MODEL:", 1))  # here the model is an argument
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _params_fail(f"MODEL: cannot read a model config from {args.model!r} (a local folder with config.json, a config.json "
                     f"file, or a hub id when the hub is reachable): {first}")
    if args.json:
        print(json.dumps({"model": facts, "rows": [{**row.__dict__, "percent_of_base": row.percent_of_base} for row in rows]}, indent=2))
    else:
        print(format_params(rows, facts))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ConfigError as exc:
        if len(exc.problems) == 1:  # one problem, one line
            where = "" if exc.source == "input" or exc.problems[0].startswith(exc.source) else f"{exc.source}: "
            print(f"error: {where}{exc.problems[0]}", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this search: the same config, overrides, cluster (--address: without
    it the resume would start a local Ray instead) and analysis choice, plus --resume."""
    options = [*(f"--set {shlex.quote(s)}" for s in args.set), *([f"--address {shlex.quote(args.address)}"] if args.address else []),
               *(["--no-analyze"] if args.no_analyze else [])]
    return " ".join(["lora-rank search", shlex.quote(args.config), *options, "--resume"])


def _interrupted_message(cfg, args: argparse.Namespace, again: str) -> str:
    """What is true after a Ctrl-C: resumable only once Tune saved the experiment's first snapshot."""
    from lora_rank_search.search.runner import is_resumable

    if is_resumable(cfg.experiment_path):
        return f"\ninterrupted; nothing finished is lost. Continue with:\n  {again}"
    fresh = again.removesuffix(" --resume")
    from lora_rank_search.search import storage

    if storage.listdir(cfg.experiment_path):
        return (f"\ninterrupted before the search saved its first snapshot: there is nothing to resume. Delete "
                f"{cfg.experiment_path!r} and start again with:\n  {fresh}")
    return f"\ninterrupted before the search started; nothing was written. Start again with:\n  {fresh}"


def _trials_in_error(trials) -> bool:
    """True (after saying so on stderr) when a trial ended in error: the search then exits 1."""
    from lora_rank_search.analysis.results import ERROR
    from lora_rank_search.contract.arms import format_lr

    if trials.empty or "status" not in trials:
        return False
    errored = trials[trials["status"] == ERROR]
    if errored.empty:
        return False
    names = ", ".join(f"r={t.r} lr={format_lr(t.lr)} seed={t.seed}" for t in errored.itertuples())
    print(f"error: {len(errored)} trial(s) ended in error ({names}); the results of the others are kept", file=sys.stderr)
    return True


if __name__ == "__main__":
    sys.exit(main())
