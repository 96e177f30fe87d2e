"""Effective rank of ΔW = scale·B·A: exact against a dense SVD, and the two summaries on known spectra."""

from __future__ import annotations

import numpy as np
import pytest

from lora_rank_search.analysis.effective_rank import adapter_scale, delta_singular_values, energy_rank, module_spectra, stable_rank


def test_singular_values_from_the_factors_equal_the_dense_svd():
    rng = np.random.default_rng(0)
    for r, fan_in, fan_out in ((1, 16, 8), (4, 32, 48), (8, 20, 20)):
        a, b = rng.normal(size=(r, fan_in)), rng.normal(size=(fan_out, r))
        dense = np.linalg.svd(2.0 * b @ a, compute_uv=False)[:r]
        assert np.allclose(delta_singular_values(a, b, 2.0), dense)


def test_a_planted_rank_k_update_inside_a_larger_adapter_has_effective_rank_k():
    rng = np.random.default_rng(1)
    r, k = 16, 3
    a = rng.normal(size=(r, 64))
    b = np.zeros((32, r))
    b[:, :k] = rng.normal(size=(32, k))  # only k columns of B are used
    sv = delta_singular_values(a, b, 1.0)
    assert energy_rank(sv) <= k and np.sum(sv > 1e-9) == k
    assert 1.0 <= stable_rank(sv) <= k


def test_summaries_on_known_spectra():
    assert energy_rank(np.array([1.0, 1.0, 1.0, 1.0])) == 4, "equal values: 90% needs all four"
    assert energy_rank(np.array([4.0, 1.0, 0.1])) == 1, "16/17.01 of the energy in the first"
    assert energy_rank(np.array([3.0, 1.0, 0.1])) == 2, "9/10.01 < 90%"
    assert energy_rank(np.zeros(4)) == 0 and stable_rank(np.zeros(4)) == 0.0
    assert stable_rank(np.array([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert stable_rank(np.array([2.0, 1.0])) == pytest.approx(1.25)


def test_module_spectra_reads_peft_names_and_scales():
    a = np.eye(2, 4)
    b = np.eye(3, 2)
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": a, "base_model.model.layers.0.q_proj.lora_B.weight": b}
    spectra = module_spectra({"lora_alpha": 8, "r": 2}, tensors)
    assert list(spectra) == ["layers.0.q_proj"]
    assert np.allclose(spectra["layers.0.q_proj"], [4.0, 4.0]), "scale alpha/r = 4"
    assert adapter_scale({"lora_alpha": 16, "use_rslora": True}, 4) == pytest.approx(8.0)
