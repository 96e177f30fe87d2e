"""Per-trial base-model load: quantize from the original weights vs. load a 4-bit checkpoint
pre-quantized once per machine (the default, `quantization.prequantized_cache: true`).

    .venv/bin/python bench/model_load.py [--model builtin:smollm2-135m-instruct] [--repeats 3]

Prints median load seconds of each route and the speed-up, measured in one run, alternating.
Target: >= 2x faster per-trial load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._common import header, median_time  # noqa: E402

QUANT = {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from lora_rank_search.search.config import QuantizationConfig
    from lora_rank_search.trainables.model import load_base_model, prequantized_dir, resolve_model
    from lora_rank_search.trainables.trial import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)  # one trial = one CPU by default
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    path = resolve_model(args.model)
    header("model_load: per-trial base-model load time")
    print(f"model: {args.model} ({path}), device {device}, NF4 + double quant, 1 torch thread")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LORA_RANK_SEARCH_CACHE"] = cache  # a cold cache of our own
        cached = QuantizationConfig(**QUANT, prequantized_cache=True)
        first, _ = median_time(lambda: load_base_model(path, cached, device), 1)
        assert (prequantized_dir(path, cached, device) / "config.json").is_file()
        fresh_times, cached_times = [], []
        for _ in range(args.repeats):  # alternate so drift hits both routes alike
            fresh_times.append(median_time(lambda: load_base_model(path, QuantizationConfig(**QUANT, prequantized_cache=False), device), 1)[0])
            cached_times.append(median_time(lambda: load_base_model(path, cached, device), 1)[0])
    fresh = sorted(fresh_times)[len(fresh_times) // 2]
    hit = sorted(cached_times)[len(cached_times) // 2]
    print(f"first trial on a machine (quantize + save cache): {first:.2f} s")
    print(f"quantize from original weights, per trial:       {fresh:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in fresh_times)})")
    print(f"load pre-quantized 4-bit checkpoint, per trial:  {hit:.2f} s  (runs: {', '.join(f'{t:.2f}' for t in cached_times)})")
    print(f"RATIO per-trial load speed-up (quantize / pre-quantized): {fresh / hit:.1f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
