"""results.md of bench/gpu_check.py, made from its results.json (one source for both)."""

from __future__ import annotations

GIB = 2**30


def _gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def _num(x, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def _error(value) -> list[str]:
    return ["", "**error**:", "", "```", str(value["error"]).strip()[-1500:], "```"]


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({results['mode']})", "",
             f"{results['date']}, `{results['command']}`, {results.get('wall_s', 0):.0f} s in all"]
    if results["mode"] != "gpu":
        lines += ["", "A smoke run on CPU with tiny shapes: it checks that every code path runs, its numbers are not GPU numbers."]
    lines += _device(results.get("device"))
    lines += _correctness(results.get("correctness"))
    lines += _packed_exact(results.get("packed_exact"))
    lines += _memory(results.get("memory"))
    lines += _packing(results.get("packing"))
    lines += _packed(results.get("packed"))
    lines += _mfu(results.get("mfu") or {}, results["anchor_8b"], results)
    seconds = results.get("section_seconds") or {}
    if seconds:
        lines += ["", "Seconds per section: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())]
    return "\n".join(lines) + "\n"


def _device(d) -> list[str]:
    if d is None:
        return []
    out = ["", "## device"]
    if "error" in d:
        return out + _error(d)
    return out + ["", "| name | memory | torch | CUDA | bitsandbytes | transformers | peft | bf16 matmul (measured) |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {d['name']} | {_gib(d['memory_bytes'])} | {d['torch']} | {d['cuda'] or '-'} | {d['bitsandbytes']} | "
                  f"{d['transformers']} | {d['peft']} | {d['matmul_bf16_tflops']:.3g} TFLOP/s ({d['matmul_size']}^3) |"]


def _correctness(c) -> list[str]:
    if c is None:
        return []
    out = ["", "## correctness"]
    if "error" in c:
        return out + _error(c)
    out += ["", f"**{'PASS' if c['passed'] else 'FAIL'}** on {c['device']}: {c['linear4bit_layers']} Linear4bit layers on "
                f"{', '.join(c['linear4bit_devices'])} ({', '.join(c['quant_types'])}, double quant {c['double_quant']}, "
                f"compute {', '.join(c['compute_dtypes'])}), {c['steps']} steps, adapter files {', '.join(c['adapter_files'])}.",
            "", f"train loss {c['loss_first']:.4f} -> {c['loss_last']:.4f}; eval loss {c['eval_loss_first']:.4f} -> "
                f"{c['eval_loss_last']:.4f}; reloaded adapter {c['eval_loss_reloaded']:.4f} (relative difference "
                f"{c['reload_relative_difference']:.1e}); the base without it {c['eval_loss_base']:.4f}.",
            "", "| check | |", "|---|---|"]
    out += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in c["checks"].items()]
    return out


def _memory(rows) -> list[str]:
    if rows is None:
        return []
    out = ["", "## memory: the estimate `gpus_per_trial: auto` plans with, against the measured peak", "",
           "measured = max allocated + the process's CUDA context (on CPU: the process's peak RSS); estimated/measured"
           " above 1 means the plan is on the safe side. The peak includes the evaluations (eval batch = 2 x batch).", "",
           "| model | shape | checkpointing | estimated | measured | estimated/measured | max allocated | context |"
           " max reserved | GPU in use | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['shape']} | {'on' if r['gradient_checkpointing'] else 'off'} |"
        if "error" in r:
            out.append(f"{head} error: {str(r['error']).strip().splitlines()[-1][:200]} | | | | | | | |")
            continue
        out.append(f"{head} {_gib(r['estimated_bytes'])} | {_gib(r['measured_bytes'])} | "
                   f"**{r['ratio_estimated_to_measured']:.2f}** | {_gib(r['max_allocated_bytes'])} | {_gib(r['context_bytes'])} | "
                   f"{_gib(r['max_reserved_bytes'])} | {_gib(r['device_used_peak_bytes'])} | {_num(r['tokens_per_s'])} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        r = ok[0]
        out += ["", f"batch {r['batch_size']} x {r['seq_len']} tokens, LoRA on all linear layers at the rank of the plan"
                    " (results.json: plan.memory_rank); each row's estimate by part is in results.json."]
    return out


def _packing(rows) -> list[str]:
    if rows is None:
        return []
    out = ["", "## packing: trial processes per GPU", "",
           "aggregate tokens/s = tokens trained by all processes in the window where all of them train / its length.", "",
           "| trials/GPU | gpus_per_trial | aggregate tokens/s | vs 1 per GPU | per-process peak (max allocated) |"
           " GPU in use (all) | trained together |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['trials_per_gpu']} | | error: {str(r['error']).strip().splitlines()[-1][:200]} | | | | |")
            continue
        vs = "-" if r.get("vs_1_per_gpu") is None else f"{r['vs_1_per_gpu']:.2f}x"
        out.append(f"| {r['trials_per_gpu']} | {r['gpus_per_trial']:.3g} | **{_num(r['aggregate_tokens_per_s'])}** | {vs} | "
                   f"{_gib(max(r['per_process_peak_bytes']))} | {_gib(r['device_used_peak_bytes'])} | {r['all_trained_together']} |")
    return out


def _packed_exact(d) -> list[str]:
    if d is None:
        return []
    out = ["", "## packed_exact: three arms packed in one pass and each alone"]
    if "error" in d:
        return out + _error(d)
    worst = d["largest_relative_difference"]
    out += ["", f"{d['device']}, {d['mode']}, {d['steps']} steps; largest relative difference, packed vs alone: "
            f"train loss {worst['train_loss']:.1e}, eval loss {worst['eval_loss']:.1e}, adapter weights {worst['adapter_weights']:.1e}", ""]
    out += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in d["checks"].items()]
    return out


def _packed(rows) -> list[str]:
    if rows is None:
        return []
    out = ["", "## packed: N arms on one base in one process vs N processes at 1/N GPU", "",
           "Expected on a GPU: the 1B shape's pack of 4 trains >= 3x the aggregate tokens/s of 4 processes at 0.25 GPU.", "",
           "| model | arms | pack mode | pack tokens/s | N processes tokens/s | pack / processes | peak per row (pack) |"
           " peak per row (processes) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['arms']} | | error: {str(r['error']).strip().splitlines()[-1][:200]} | | | | |")
            continue
        vs = "-" if r.get("packed_vs_processes") is None else f"**{r['packed_vs_processes']:.2f}x**"
        out.append(f"| {r['model']} | {r['arms']} | {r['mode']} | {_num(r['packed_tokens_per_s'])} | {_num(r['processes_tokens_per_s'])} | "
                   f"{vs} | {_gib(r['packed_peak_bytes_per_row'])} | {_gib(r['processes_peak_bytes_per_row'])} |")
    return out


def _mfu(m: dict, anchor: dict, results: dict) -> list[str]:
    out = ["", "## mfu and the 8B anchor", "", m.get("formula", "")]
    one = m.get("1b")
    if one:
        f = one["flops_per_token"]
        out += ["", f"1B ({one['shape']} shape), 1 trial per GPU: {one['tokens_per_s']:,.0f} tokens/s x {f['total'] / 1e9:.3g} GFLOP/token "
                    f"(frozen {f['frozen'] / 1e9:.3g} + adapter {f['adapter'] / 1e9:.3g} + attention {f['attention'] / 1e9:.3g})"
                    f" = {one['achieved_tflops']:.3g} TFLOP/s of {one['peak_tflops']:.3g} measured: **MFU {100 * one['mfu']:.1f}%**"]
    else:
        out += ["", "1B shape: not measured in this run."]
    out.append("")
    if not (m.get("8b") or m.get("8b_checkpointing")):
        out.append("- 8B shape: not measured in this run")
    for key, label in (("8b", "off"), ("8b_checkpointing", "on")):
        row = m.get(key)
        if row:
            out.append(f"- 8B ({row['shape']} shape), checkpointing {label}: **{row['tokens_per_s']:,.0f} tokens/s** at {_gib(row['measured_bytes'])}"
                       f" ({row['vs_anchor_tokens_per_s']:.2f}x the anchor)")
    out.append(f"- anchor: {anchor['source']}: {anchor['tokens_per_s']:,} tokens/s at {_gib(anchor['peak_bytes'])} peak")
    return out
