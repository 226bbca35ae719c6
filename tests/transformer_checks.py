"""Shared checks for the transformer adapters: exact SVD splits and independent references."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from apd_lens import APDConfig, Decomposition
from apd_lens.engine.spec import WeightSpec, get_parameter


def randomize_(model: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    """Random values in every parameter (TL zero-inits biases; they must be tested too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def svd_split(model: nn.Module, specs: list[WeightSpec], n_components: int = 3) -> Decomposition:
    """A Decomposition whose components split each weight's SVD: singular triplet j goes to
    component j mod C, so the components sum exactly to the weight."""
    rank = max(math.ceil(_rank(model, s) / n_components) for s in specs)
    decomp = Decomposition(model, specs, APDConfig(n_components=n_components, rank=rank, progress=False))
    for spec in specs:
        # the matrix from the raw parameter, independent of the code's own to_matrix
        matrix = _matrix_by_hand(get_parameter(model, spec.name).detach(), spec)
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        comp = decomp.components[spec.name]
        a = torch.zeros(comp.A.shape, dtype=torch.float64)
        b = torch.zeros(comp.B.shape, dtype=torch.float64)
        for j in range(s.shape[0]):
            c, slot = j % n_components, j // n_components
            a[c, :, slot] = u[:, j] * s[j]
            b[c, slot, :] = vh[j]
        comp.set_from_matrices(a.to(comp.A.dtype), b.to(comp.B.dtype))
    return decomp


def _rank(model: nn.Module, spec: WeightSpec) -> int:
    return min(_matrix_by_hand(get_parameter(model, spec.name).detach(), spec).shape)


def _matrix_by_hand(param: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """[d_in, d_out] by explicit permute/reshape for the patterns the adapters use."""
    if spec.matrix_pattern is None:
        return param
    if spec.matrix_pattern == "o i -> i o":
        return param.T
    if spec.matrix_pattern == "h d e -> d (h e)":
        h, d, e = param.shape
        return param.permute(1, 0, 2).reshape(d, h * e)
    if spec.matrix_pattern == "h e d -> (h e) d":
        h, e, d = param.shape
        return param.reshape(h * e, d)
    raise AssertionError(f"no hand-written view for {spec.matrix_pattern!r}")


def _param_from_matrix_by_hand(matrix: torch.Tensor, like: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    if spec.matrix_pattern is None:
        return matrix
    if spec.matrix_pattern == "o i -> i o":
        return matrix.T
    if spec.matrix_pattern == "h d e -> d (h e)":
        h, d, e = like.shape
        return matrix.reshape(d, h, e).permute(1, 0, 2)
    if spec.matrix_pattern == "h e d -> (h e) d":
        return matrix.reshape(like.shape)
    raise AssertionError(spec.matrix_pattern)


def masked_weight(dec, name: str, mask_row: torch.Tensor | None, delta_weight) -> torch.Tensor:
    """An SPD decomposition's (``dec``) masked weight W'(x) = Σ_c m_c V[:, c] ⊗ U[c, :] + r_Δ (W - V U)
    (the last term with the delta component only), by loops, in the parameter's own shape."""
    spec = dec.specs_by_name[name]
    param = get_parameter(dec.model, name).detach()
    target = _matrix_by_hand(param, spec)
    sub = dec.subcomponents[name]
    V, U = sub.V.detach(), sub.U.detach()
    out = torch.zeros_like(target)
    full = torch.zeros_like(target)
    for c in range(V.shape[1]):
        piece = torch.outer(V[:, c], U[c])
        full += piece
        out += (1.0 if mask_row is None else mask_row[c]) * piece
    if dec.config.use_delta_component:
        out += delta_weight * (target - full)
    return _param_from_matrix_by_hand(out, param, spec)


def subset_reference(model: nn.Module, decomp: Decomposition, keep: list[int], tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a copy of the model whose decomposed weights are the sum of the kept components."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for spec in decomp.specs:
            comp = decomp.components[spec.name]
            matrix = torch.einsum("cim,cmo->io", comp.A[keep], comp.B[keep])
            param = get_parameter(ref, spec.name)
            param.copy_(_param_from_matrix_by_hand(matrix, param, spec))
        return ref(tokens)


def check_exact_split(model: nn.Module, specs: list[WeightSpec], tokens: torch.Tensor, atol: float = 1e-5) -> None:
    """All components on (SVD split) reproduces the logits; a component subset on every token
    reproduces a model built from that subset's weights; a zeroed component changes the logits."""
    with torch.no_grad():
        target = model(tokens)
    decomp = svd_split(model, specs)
    with torch.no_grad():
        out = decomp(tokens)
        assert out.shape == target.shape
        err = (out - target).abs().max().item()
        assert err < atol, f"all-on SVD split differs from the model's logits by {err}"
        keep = [0, 2]
        mask = torch.zeros(*tokens.shape, decomp.n_components)
        mask[..., keep] = 1.0
        sub = decomp(tokens, mask)
        ref = subset_reference(model, decomp, keep, tokens)
        err_sub = (sub - ref).abs().max().item()
        assert err_sub < atol, f"masked forward differs from the subset model by {err_sub}"
        assert (sub - target).abs().max().item() > 100 * atol, "dropping a component did not change the logits"


def tiny_lm(d_vocab: int, n_ctx: int, seed: int = 3):
    """A 1-layer float64 HookedTransformer (d_model 8, 2 heads, d_mlp 12, folded norms) with random weights."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = dict(n_layers=1, d_model=8, d_head=4, n_heads=2, d_mlp=12, d_vocab=d_vocab, n_ctx=n_ctx, act_fn="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg, normalization_type="LNPre", dtype=torch.float64))
    randomize_(model, scale=0.5, seed=seed)
    return model.eval()


def spread_ci_(dec, low: float = -0.5, high: float = 1.2, u_scale: float = 1.7):
    """Spread an SPD decomposition's CI functions' outputs over ``[low, high]`` (some subcomponents off,
    some on, some in between) and scale U by ``u_scale`` (so the delta component is not small)."""
    with torch.no_grad():
        for sub in dec.subcomponents.values():
            sub.U.mul_(u_scale)
            for fn in sub.ci_fns:
                fn.b_out.copy_(torch.linspace(low, high, fn.b_out.shape[0]))
    return dec
