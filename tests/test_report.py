"""The SPD report's evaluation (``evaluate_spd``) against loops: output errors of the unmasked, CI-masked
and stochastic-masked model from per-example forwards with the masked weights written out, and the CI
statistics (L0, alive subcomponents, frequencies) and faithfulness by explicit counting."""

from __future__ import annotations

import pytest
import torch

from apd_lens import SPDConfig, SPDDecomposition
from apd_lens.analysis.report import STOCHASTIC_SAMPLES, evaluate_spd, live_parts
from tests.toy_models import tms_with_bias
from tests.transformer_checks import masked_weight


@pytest.fixture(autouse=True)
def _float64(float64):
    """float64, so that 1e-6 relative is far above rounding."""


def _tms_out(dec, x_n, masks_n) -> torch.Tensor:
    """TMS with bias on one input: ReLU((x W'_0) W'_1ᵀ + b), each use's masked weight by loops."""
    w0 = masked_weight(dec, "W", masks_n["W"], 1.0)
    w1 = masked_weight(dec, "W", masks_n["W:use1"], 1.0)
    return torch.relu((x_n @ w0) @ w1.T + dec.model.b_final)


def test_evaluate_spd_matches_loops(monkeypatch):
    model, specs, x = tms_with_bias()
    dec = SPDDecomposition(model, specs, SPDConfig(n_subcomponents=6, progress=False))
    with torch.no_grad():  # CI values spread over [0, 1] (some below and above the 0.1 threshold), V U != W
        for sub in dec.subcomponents.values():
            sub.U.mul_(1.7)
            for fn in sub.ci_fns:
                fn.b_out.copy_(torch.tensor([-0.5, 0.05, 0.08, 0.3, 0.7, 1.2]))
    drawn = []
    sample_masks = dec.sample_masks

    def record(ci, generator=None):
        drawn.append(sample_masks(ci, generator))
        return drawn[-1]

    monkeypatch.setattr(dec, "sample_masks", record)
    got = evaluate_spd(dec, x)
    assert len(drawn) == STOCHASTIC_SAMPLES
    N, C = x.shape[0], 6
    target = model(x).detach()
    ci = dec.causal_importances(x)

    def mse(masks_of) -> float:
        return sum(float((_tms_out(dec, x[n], masks_of(n)) - target[n]).square().mean()) for n in range(N)) / N

    ones = torch.ones(C)
    assert got["mse_all_subcomponents"] == pytest.approx(mse(lambda n: {"W": ones, "W:use1": ones}), abs=1e-12)
    ci_mse = mse(lambda n: {s: ci[s][n] for s in ci})
    assert ci_mse > 1e-6 and got["mse_ci_masked"] == pytest.approx(ci_mse, rel=1e-6)
    stochastic = sum(mse(lambda n, m=m: {s: m[s][n] for s in m}) for m in drawn) / len(drawn)
    assert got["mse_stochastic_masked"] == pytest.approx(stochastic, rel=1e-6)

    for site, g in ci.items():
        on = [[float(g[n, c]) > 0.1 for c in range(C)] for n in range(N)]
        assert got["ci_l0"][site] == pytest.approx(sum(sum(row) for row in on) / N)
        assert got["subcomponents_alive"][site] == sum(any(on[n][c] for n in range(N)) for c in range(C))
        assert got["subcomponent_frequency"][site] == pytest.approx(
            [sum(on[n][c] for n in range(N)) / N for c in range(C)]
        )
    assert 0 < got["subcomponents_alive"]["W"] < C  # some dead, some alive: the counts are not trivial

    V, U = dec.subcomponents["W"].V.detach(), dec.subcomponents["W"].U.detach()
    W = model.W.detach()
    residual = sum(
        float(W[i, j] - sum(V[i, c] * U[c, j] for c in range(C))) ** 2
        for i in range(W.shape[0])
        for j in range(W.shape[1])
    )
    assert got["relative_faithfulness"]["W"] == pytest.approx(residual / float(W.square().sum()), rel=1e-6)
    norms = [float((torch.outer(V[:, c], U[c])).square().sum().sqrt()) for c in range(C)]
    assert got["subcomponent_norms"]["W"] == pytest.approx(norms, rel=1e-6)


def test_live_parts_are_the_parts_above_a_hundredth_of_the_largest_norm_largest_first():
    parts = torch.zeros(7, 3, 2)
    for c, scale in enumerate([1.0, 1e-4, 3.0, 0.02, 0.01, 0.5, 0.0]):  # 0.01 x 3 = 0.03: 0.02 and 0.01 are dead
        parts[c, 0, 0] = scale
    assert live_parts(parts).tolist() == [2, 0, 5]
