"""The Ray Tune harness against a bare single-process loop: per-step time and per-trial start-up.

    .venv/bin/python bench/overhead.py [--ranks 1 2 4 8 16] [--steps 200] [--eval-every 20]

Both sides train the same ranks for the same steps on the tiny Llama with one torch thread, one
trial at a time, writing the same checkpoints; the bare loop calls `run_trial` directly, Tune runs
`lora_trial` in a fresh Ray worker process per trial and persists every checkpoint to storage.
Per-step time = (last report - first report) / steps between them, so it includes evaluation and
checkpointing. Start-up = from Tune starting the trial (driver clock) to the first training step
(worker start, imports, object-store fetch, model load), against the model load alone in the bare loop.
Targets: per-step ratio <= 1.10, per-trial start-up <= 10 s.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header  # noqa: E402


def _config(root: str, model: str, data: str, ranks: list[int], steps: int, eval_every: int) -> dict:
    return {
        "name": "overhead",
        "storage_path": os.path.join(root, "runs"),
        "model": {"name_or_path": model},
        "data": {"source": data, "max_seq_len": 32},
        "lora": {"ranks": ranks, "target_modules": "all-linear", "dropout": 0.0},
        "train": {"max_steps": steps, "eval_every": eval_every, "batch_size": 16, "learning_rate": 3e-3},
        "scheduler": {"type": "none"},
        "resources": {"gpus_per_trial": 0, "cpus_per_trial": 1, "max_concurrent": 1},
    }


def _per_step(reports: list[dict]) -> float:
    first, last = reports[0], reports[-1]
    return (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])


def bare(cfg, prepared) -> dict[int, dict]:
    from lora_rank_search.search.space import trial_settings
    from lora_rank_search.trainables.trial import run_trial

    settings = trial_settings(cfg, prepared.model_path, prepared.targets)
    # Warm-up (not measured): fills the pre-quantized cache, as a first trial on a machine would,
    # and the allocator; without it the first measured rank runs ~25% slower per step.
    warm = dataclasses.replace(settings, train=dataclasses.replace(settings.train, max_steps=2 * settings.train.eval_every))
    run_trial({"r": cfg.lora.ranks[0], "seed": 0}, warm, prepared.data, lambda m, f: None, threads=1)
    out = {}
    for r in cfg.lora.ranks:
        reports: list[dict] = []
        start = time.time()
        run_trial({"r": r, "seed": 0}, settings, prepared.data, lambda m, f: reports.append(dict(m)), threads=1)
        out[r] = {"per_step": _per_step(reports), "startup": reports[0]["load_seconds"], "total": time.time() - start}
    return out


def tune(cfg) -> dict[int, dict]:
    import ray
    from ray.tune import Callback

    from lora_rank_search.analysis.results import load_experiment
    from lora_rank_search.search import runner

    starts: dict[int, float] = {}

    class StartTimes(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            starts[trial.config["r"]] = time.time()

    original = runner.build_tuner

    def with_callback(*args, **kwargs):
        tuner = original(*args, **kwargs)
        tuner._local_tuner._run_config.callbacks.append(StartTimes())
        return tuner

    runner.build_tuner = with_callback
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        experiment = runner.run_search(cfg, log=lambda _: None)
    finally:
        ray.shutdown()
        runner.build_tuner = original
    _, history = load_experiment(experiment)
    out = {}
    for r, rows in history.groupby("r"):
        reports = rows.sort_values("step").to_dict("records")
        startup = reports[0]["started_at"] - starts[int(r)] + reports[0]["load_seconds"]
        out[int(r)] = {"per_step": _per_step(reports), "startup": startup}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=20)
    args = parser.parse_args()

    from lora_rank_search.search.config import parse_config
    from lora_rank_search.search.runner import prepare
    from lora_rank_search.trainables.tiny import build_tiny_llama, chain_records, word_list, write_jsonl
    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    header("overhead: Ray Tune harness vs a bare loop")
    with tempfile.TemporaryDirectory() as root:
        os.environ["LORA_RANK_SEARCH_CACHE"] = os.path.join(root, "cache")
        words = word_list(60)
        model = str(build_tiny_llama(os.path.join(root, "model"), words))
        data = str(write_jsonl(chain_records(words, 600), os.path.join(root, "data.jsonl")))
        cfg = parse_config(_config(root, model, data, args.ranks, args.steps, args.eval_every))
        prepared = prepare(cfg, log=lambda _: None)
        bare_results = bare(cfg, prepared)
        tune_results = tune(cfg)
    print(f"tiny Llama (hidden 64, 2 layers), ranks {args.ranks}, {args.steps} steps, eval every {args.eval_every}, 1 thread")
    print(f"{'r':>4} {'bare s/step':>12} {'tune s/step':>12} {'ratio':>6} {'bare start-up s':>16} {'tune start-up s':>16}")
    ratios, startups = [], []
    for r in args.ranks:
        b, t = bare_results[r], tune_results[r]
        ratios.append(t["per_step"] / b["per_step"])
        startups.append(t["startup"])
        print(f"{r:>4} {b['per_step']:>12.4f} {t['per_step']:>12.4f} {ratios[-1]:>6.2f} {b['startup']:>16.2f} {t['startup']:>16.2f}")
    print(f"RATIO per-step time, Tune / bare (median over ranks): {statistics.median(ratios):.2f}  (target <= 1.10)")
    print(f"RESULT per-trial start-up under Tune (median): {statistics.median(startups):.1f} s  (target <= 10 s)")


if __name__ == "__main__":
    main()
