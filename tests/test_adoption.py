"""Orphan adoption (apd_lens.methods.apd.adoption), checked against explicit computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import apd_lens
from apd_lens.engine.losses import output_loss, output_loss_per_point
from apd_lens.methods.apd import adoption
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.methods.apd.splitting import ComponentSplitter
from apd_lens.models.tms import TMS, TMSData


@pytest.mark.parametrize("kind", ["mse", "kl"])
@pytest.mark.parametrize("shape, n_batch_dims", [((6, 5), 1), ((3, 4, 5), 2), ((3, 4, 5), 1)])
def test_output_loss_per_point_matches_loops_and_averages_to_the_loss(kind, shape, n_batch_dims):
    gen = torch.Generator().manual_seed(0)
    output, target = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    got = output_loss_per_point(output, target, kind, n_batch_dims)
    points = output.reshape(-1, *shape[n_batch_dims:]), target.reshape(-1, *shape[n_batch_dims:])
    expected = []
    for o, t in zip(*points, strict=True):
        if kind == "mse":
            expected.append(sum(float(a - b) ** 2 for a, b in zip(o.flatten(), t.flatten(), strict=True)) / o.numel())
        else:  # KL(target || output) per position (last dim), averaged over the point's positions
            rows_o, rows_t = o.reshape(-1, shape[-1]), t.reshape(-1, shape[-1])
            kls = []
            for ro, rt in zip(rows_o, rows_t, strict=True):
                p, q = F.softmax(rt, -1), F.softmax(ro, -1)
                kls.append(sum(float(p[i] * (p[i].log() - q[i].log())) for i in range(shape[-1])))
            expected.append(sum(kls) / len(kls))
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.mean(), output_loss(output, target, kind))


def _tms_decomposition(n_components=10, **changes):
    model = TMS(8, 3, seed=0)
    config = model.apd_default_config().replace(n_components=n_components, progress=False, topk=1.0, **changes)
    return model, Decomposition(model, model.apd_weight_specs(), config)


@pytest.mark.parametrize("unit_norm_A", [False, True])
def test_carve_direction_moves_every_other_components_slice_into_the_target(unit_norm_A):
    model, dec = _tms_decomposition(unit_norm_A=unit_norm_A)
    comp = dec.components["W"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        comp.A.copy_(torch.randn(comp.A.shape, generator=gen))
        comp.B.copy_(torch.randn(comp.B.shape, generator=gen))
        comp.A[4].zero_()
        comp.B[4].zero_()
    opt = torch.optim.Adam(dec.component_parameters())
    dec.component_parameters()[0].grad = torch.ones_like(comp.A)
    dec.component_parameters()[1].grad = torch.ones_like(comp.B)
    opt.step()  # moments to reset
    before = (comp.A @ comp.B).detach().double()
    u = torch.randn(8, generator=gen, dtype=torch.float64)
    u = u / u.norm()
    assert adoption.carve_direction(dec, opt, target=4, directions={"W": u})
    after = (comp.A @ comp.B).detach().double()
    # explicit: row space of the 8 inputs; P_c's slice along u is u u^T P_c
    for c in range(10):
        if c == 4:
            expected = sum(torch.outer(u, u @ before[o]) for o in range(10) if o != 4)
        else:
            expected = before[c] - torch.outer(u, u @ before[c])
        torch.testing.assert_close(after[c], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after.sum(0), before.sum(0), rtol=1e-5, atol=1e-5)
    for param in (comp.A, comp.B):
        for moment in opt.state[param].values():
            if moment.shape == param.shape:
                assert moment[4].abs().max() == 0 and moment[3].abs().min() > 0
    if unit_norm_A:
        norms = comp.A.detach().norm(dim=1)
        torch.testing.assert_close(norms[norms > 1e-6], torch.ones_like(norms[norms > 1e-6]))


def _own_rows(dec, W, orphan: bool):
    """Components 1-7 own features 1-7 (rank one each); feature 0's row either in component 0, or
    smeared in sevenths over components 1-7 (an orphan) with component 0 empty; 8 and 9 empty."""
    comp = dec.components["W"]
    with torch.no_grad():
        comp.A.zero_()
        comp.B.zero_()
        for f in range(1, 8):
            comp.A[f][f, 0], comp.B[f][0] = 1.0, W[f]
            if orphan:
                comp.A[f][0, 1], comp.B[f][1] = 1.0, W[0] / 7
        if not orphan:
            comp.A[0][0, 0], comp.B[0][0] = 1.0, W[0]
    return comp


def _batches():
    return [TMSData(8, 512, p=0.1, seed=20 + i).sample() for i in range(4)]


def test_an_orphaned_feature_is_adopted_by_an_unused_component():
    model, dec = _tms_decomposition()
    W = model.W.detach()
    comp = _own_rows(dec, W, orphan=True)
    total = (comp.A @ comp.B).detach().sum(0)
    opt = torch.optim.Adam(dec.component_parameters())
    found = adoption.adopt_orphans(dec, opt, targets=[0, 8, 9], batches=_batches(), worst_share=0.05, step=7)
    assert [a.target for a in found] == [0], found
    assert found[0].error_after < 0.95 * found[0].error_before and found[0].step == 7
    parts = (comp.A @ comp.B).detach()
    torch.testing.assert_close(parts.sum(0), total, rtol=1e-5, atol=1e-6)
    assert F.cosine_similarity(parts[0][0], W[0], dim=0) > 0.99 and parts[0][0].norm() > 0.85 * W[0].norm()
    assert parts[0][1:].norm() < 0.15 * W[0].norm()  # mostly feature 0's row (u is close to, not exactly, e_0)
    for f in range(1, 8):  # the others keep their own row, and lose most of W[0]'s seventh
        torch.testing.assert_close(parts[f][f], W[f], rtol=0.05, atol=0.01)
        assert abs(parts[f][0] @ W[0]) / W[0].norm() < 0.25 * (W[0].norm() / 7)  # W[0]'s part mostly gone


def test_nothing_is_adopted_when_every_mechanism_has_its_component():
    model, dec = _tms_decomposition()
    comp = _own_rows(dec, model.W.detach(), orphan=False)
    A, B = comp.A.detach().clone(), comp.B.detach().clone()
    opt = torch.optim.Adam(dec.component_parameters())
    assert adoption.adopt_orphans(dec, opt, targets=[8, 9], batches=_batches(), worst_share=0.05, step=7) == []
    assert torch.equal(comp.A.detach(), A) and torch.equal(comp.B.detach(), B)  # undone exactly


def test_the_splitter_adopts_at_its_check_and_keeps_the_history_in_its_state():
    model, dec = _tms_decomposition(split_every=4, split_until=1.0, adopt_orphans=0.05, split_ratio=50.0)
    _own_rows(dec, model.W.detach(), orphan=True)
    opt = torch.optim.Adam(dec.component_parameters())
    splitter = ComponentSplitter(dec, opt)
    for step, x in enumerate(_batches()):
        dec.topk_mask(x)  # counted at hook_mask, as in training
        splitter.after_step(step, x)
    state = splitter.state_dict()
    splitter.close()
    assert [a.target for a in dec.adoption_history] == [0] and dec.split_history == []
    other = ComponentSplitter(dec, opt)
    other.load_state_dict(state)
    assert other.adoptions == splitter.adoptions
    other.close()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"split_every": 10, "adopt_orphans": 0.0}, "adopt_orphans"),
        ({"split_every": 10, "adopt_orphans": 0.6}, "adopt_orphans"),
        ({"adopt_orphans": 0.01}, "adopt_orphans needs split_every"),
    ],
)
def test_bad_adoption_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        apd_lens.APDConfig(**bad)
