"""Effective rank of trained adapters: how many directions of ΔW = scale · B·A a LoRA really uses.

For every adapted module, the singular values of ΔW (out x in, rank <= r) are computed exactly
from the two thin factors without forming ΔW: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR),
ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the singular values of ΔW are those of the r x r matrix
scale · R_B R_Aᵀ. Per module we report
- energy rank: the smallest k whose top-k singular values hold `ENERGY` (90%) of sum σ²;
- stable rank: sum σ² / σ_max² (a smooth, noise-robust count of significant directions).
A trial's numbers are the median over its modules (the mean and max are kept too). A rank-64
adapter with an energy rank of 5 is independent evidence that a smaller r would do.

Only numpy and safetensors are needed (no torch): this runs on a laptop over a synced experiment.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

ENERGY = 0.9  # share of sum sigma^2 the energy rank must hold


def delta_singular_values(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """Singular values (descending) of scale · B·A for A (r x in) and B (out x r)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    _, rb = np.linalg.qr(b)  # B = Q_B R_B, R_B is r x r
    _, ra = np.linalg.qr(a.T)  # Aᵀ = Q_A R_A
    return np.linalg.svd(scale * rb @ ra.T, compute_uv=False)


def energy_rank(sv: np.ndarray, share: float = ENERGY) -> int:
    """Smallest k with sum of the top-k σ² >= share · sum σ² (0 for an all-zero update)."""
    energy = np.asarray(sv, dtype=np.float64) ** 2
    total = energy.sum()
    if total <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(energy) / total, share - 1e-12) + 1)


def stable_rank(sv: np.ndarray) -> float:
    """sum σ² / max σ² (0 for an all-zero update)."""
    sv = np.asarray(sv, dtype=np.float64)
    top = float(sv.max()) if sv.size else 0.0
    return float((sv**2).sum() / top**2) if top > 0 else 0.0


def adapter_scale(config: dict, r: int) -> float:
    """PEFT's multiplier of B·A: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(config.get("lora_alpha", r))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def module_spectra(config: dict, tensors: dict) -> dict[str, np.ndarray]:
    """{module name: singular values of its ΔW} for every LoRA pair in an adapter's tensors."""
    out = {}
    for name, a in sorted(tensors.items()):
        if not name.endswith("lora_A.weight"):
            continue
        module = name[: -len(".lora_A.weight")]
        b = tensors.get(module + ".lora_B.weight")
        if b is None:
            continue
        r = int(a.shape[0])
        leaf = module.rsplit(".", 1)[-1]
        r_eff = int((config.get("rank_pattern") or {}).get(leaf, r))
        out[module.removeprefix("base_model.model.")] = delta_singular_values(a, b, adapter_scale(config, r_eff))
    return out


def summarize(spectra: dict[str, np.ndarray], share: float = ENERGY) -> dict:
    """Median/mean/max of the per-module energy rank and stable rank."""
    if not spectra:
        return {"modules": 0}
    energy = np.array([energy_rank(s, share) for s in spectra.values()], dtype=float)
    stable = np.array([stable_rank(s) for s in spectra.values()], dtype=float)
    return {
        "modules": len(spectra),
        "energy_rank_median": float(np.median(energy)),
        "energy_rank_mean": float(energy.mean()),
        "energy_rank_max": int(energy.max()),
        "stable_rank_median": float(np.median(stable)),
        "stable_rank_mean": float(stable.mean()),
        "stable_rank_max": float(stable.max()),
    }


def effective_rank_table(experiment: str, trials: pd.DataFrame, history: pd.DataFrame, share: float = ENERGY) -> pd.DataFrame:
    """One row per trial with a kept checkpoint: its best checkpoint's effective-rank summary.

    Columns: trial_id, r, seed, checkpoint, step, eval_loss, modules, energy_rank_{median,mean,max},
    stable_rank_{median,mean,max}.
    """
    from lora_rank_search.analysis.checkpoints import best_checkpoint, read_adapter

    rows = []
    for t in trials.itertuples():
        if getattr(t, "status", "") == "error":
            continue
        ckpt = best_checkpoint(experiment, trials, history, str(t.trial_id))
        if ckpt is None:
            continue
        config, tensors = read_adapter(ckpt.adapter)
        rows.append({
            "trial_id": str(t.trial_id), "r": int(t.r), "seed": int(t.seed), "checkpoint": ckpt.name,
            "step": ckpt.step, "eval_loss": ckpt.eval_loss, **summarize(module_spectra(config, tensors), share),
        })
    return pd.DataFrame(rows)


def evidence_sentence(table: pd.DataFrame, recommended: Optional[int]) -> str:
    """Plain words: do the large-rank adapters use all their directions?"""
    if table.empty or "energy_rank_median" not in table:
        return "No adapter checkpoints were found, so the effective rank could not be measured."
    by_rank = table.groupby("r")[["energy_rank_median", "stable_rank_median"]].median()
    top = int(by_rank.index.max())
    used, stable = float(by_rank.loc[top, "energy_rank_median"]), float(by_rank.loc[top, "stable_rank_median"])
    text = (f"Effective rank: the largest adapter (r={top}) puts {ENERGY:.0%} of its update energy into a median of "
            f"{used:g} of its {top} directions per module (stable rank {stable:.1f})")
    if recommended is None:
        return text + "."
    if recommended < top and min(used, stable) <= recommended:
        return text + f", no more than the recommended r={recommended}: independent evidence that r={recommended} suffices."
    if recommended < top:
        return text + (f", more than the recommended r={recommended}; energy is not loss: those extra directions did not "
                       "lower the eval loss beyond the tolerance.")
    if used <= top / 2:
        return text + ": it leaves much of its capacity unused, so extend the grid upward in small steps."
    return text + ": nearly all of them, consistent with a task that wants a larger rank."
