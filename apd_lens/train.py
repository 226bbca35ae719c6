"""``decompose``: the APD training loop."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from apd_lens.config import APDConfig
from apd_lens.data import iterate_batches
from apd_lens.decomposition import Decomposition
from apd_lens.schedule import lr_factor
from apd_lens.spec import WeightSpec

logger = logging.getLogger(__name__)


def default_config(model: nn.Module) -> APDConfig:
    """The model's own paper settings (``model.apd_default_config()``) or generic defaults."""
    make = getattr(model, "apd_default_config", None)
    return make() if callable(make) else APDConfig()


def resolve_specs(
    model: nn.Module, weights: list[WeightSpec] | None, patterns: Iterable[str] | None
) -> list[WeightSpec]:
    """The weights to decompose: given explicitly, declared by the model (``apd_weight_specs()``),
    or produced by an adapter; then filtered by the config's name patterns."""
    if weights is None:
        declare = getattr(model, "apd_weight_specs", None)
        if callable(declare):
            weights = list(declare())
        else:
            from apd_lens.adapters import specs_for_model

            weights = specs_for_model(model)
    weights = list(weights)
    if patterns is not None:
        patterns = list(patterns)
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(w.name, pat) for w in weights):
                raise KeyError(
                    f"weight pattern {pat!r} matches none of the model's weights {[w.name for w in weights]}"
                )
        weights = [w for w in weights if any(fnmatch.fnmatchcase(w.name, p) for p in patterns)]
    if not weights:
        raise ValueError("no weights to decompose")
    return weights


def decompose(
    model: nn.Module,
    data: Tensor | Iterable,
    config: APDConfig | None = None,
    *,
    weights: list[WeightSpec] | None = None,
) -> Decomposition:
    """Decompose ``model``'s weights into parameter components with APD.

    ``data``: a Tensor of inputs (shuffled into batches of ``config.batch_size``), or an
    iterable of batches / a DataLoader. ``config``: defaults to the model's paper settings.
    ``weights``: explicit weight descriptions; by default the model's ``apd_weight_specs()``.
    Returns the trained :class:`Decomposition` (its ``loss_history`` holds the logged terms).
    """
    config = config if config is not None else default_config(model)
    if not isinstance(config, APDConfig):
        raise TypeError(f"config must be an APDConfig, got {type(config).__name__}")
    config.validate()
    model = model.to(config.device)
    specs = resolve_specs(model, weights, config.weights)
    torch.manual_seed(config.seed)
    decomposition = Decomposition(model, specs, config)
    data_gen = torch.Generator().manual_seed(config.seed)
    probe_gen = torch.Generator().manual_seed(config.seed + 1)
    batches = iterate_batches(data, config.batch_size, data_gen, config.device)
    optimizer = torch.optim.Adam(decomposition.component_parameters(), lr=config.lr)
    run_steps(decomposition, batches, optimizer, probe_gen)
    return decomposition


def run_steps(
    decomposition: Decomposition,
    batches,
    optimizer: torch.optim.Optimizer,
    probe_gen: torch.Generator | None = None,
    start_step: int = 0,
) -> None:
    """Run the optimization from ``start_step`` to ``config.steps``."""
    cfg = decomposition.config
    bar = tqdm(range(start_step, cfg.steps), disable=not cfg.progress, desc="APD", dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.lr_schedule, cfg.lr_warmup_frac)
        x = next(batches)
        terms = decomposition.losses(x, generator=probe_gen)
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"step {step}: non-finite loss term(s) {bad}: { {k: float(v) for k, v in terms.items()} }"
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        optimizer.step()
        if cfg.unit_norm_A:
            for comp in decomposition.components.values():
                comp.normalize_A()
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "lr": optimizer.param_groups[0]["lr"]}
            row.update({k: v.item() for k, v in terms.items()})
            decomposition.loss_history.append(row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in row.items() if k not in ("step", "lr")})
