"""``decompose``: the training loop every method shares, with run directories, checkpoints and resuming.

The loop knows a decomposition only through :class:`~apd_lens.engine.base.DecompositionBase`: its
loss terms, its trainable parameters and state, and its optional before-training, after-update and
between-steps work. Which method runs follows from the config's class (``APDConfig``, ``SPDConfig``;
see :mod:`apd_lens.methods`).
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from apd_lens.engine.base import DecompositionBase, TrainingCallback
from apd_lens.engine.config import DecompositionConfig
from apd_lens.engine.spec import WeightSpec
from apd_lens.io import COMPONENTS_FILE, CONFIG_FILE, check_target, saved_method
from apd_lens.methods import get_method, method_of_config
from apd_lens.training import distributed
from apd_lens.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    set_rng_state,
)
from apd_lens.training.data import BatchStream, check_data_tensor, iterate_batches
from apd_lens.training.malloc_tuning import keep_freed_memory
from apd_lens.training.recorder import METRICS_FILE, RunRecorder
from apd_lens.training.schedule import lr_factor

logger = logging.getLogger(__name__)


class UntrainedWarning(UserWarning):
    """``decompose`` was asked for 0 steps: what it returns has not been trained."""


RESUME_MAY_CHANGE = frozenset({"progress", "device", "log_every"})
"""Config fields that may differ between a checkpoint and the run resuming it."""


def default_config(model: nn.Module, method: str | None = None, preset: str | None = None) -> DecompositionConfig:
    """The model's own settings for ``method`` (``model.apd_default_config()``,
    ``model.spd_default_config()``) or the method's generic defaults. Another ``preset`` than ``"default"``
    (e.g. ``"paper"``) is passed on to the model's function; a model without one refuses it.

    A language model (HookedTransformer, TransformerBridge) without settings of its own gets the LM
    recipe: SPD with the ``"vpd"`` preset (:func:`~apd_lens.methods.spd.presets.vpd_config`: KL on the
    logits, C per matrix scaled to its size), also when ``method`` is None; ``preset="lm_toy"`` gives the
    toy models' SPD recipe on the same matrices. ``method=None`` means ``"apd"`` for every other model."""
    from apd_lens.adapters import is_language_model

    language_model = is_language_model(model)
    spec = get_method(method or ("spd" if language_model else "apd"))
    make = getattr(model, f"{spec.name}_default_config", None)
    if language_model and spec.name == "spd" and not callable(make):
        from apd_lens.methods.spd.presets import SPD_PRESETS

        chosen = "vpd" if preset in (None, "default") else preset
        if chosen not in SPD_PRESETS:
            raise ValueError(f"a language model's SPD presets are {sorted(SPD_PRESETS)}, got {preset!r}")
        return SPD_PRESETS[chosen](model)
    if preset is None or preset == "default":  # every model has a default: its own, or the method's
        return make() if callable(make) else spec.config_class()
    if not callable(make):
        raise ValueError(f"{type(model).__name__} has no {spec.name}_default_config(), so no preset {preset!r}")
    return make(preset=preset)


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
    config: DecompositionConfig | None = None,
    *,
    method: str | None = None,
    weights: list[WeightSpec] | None = None,
    run_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 2,
    resume: str | Path | bool | None = None,
    overwrite: bool = False,
    wandb_project: str | None = None,
    wandb_kwargs: dict[str, Any] | None = None,
) -> DecompositionBase:
    """Decompose ``model``'s weights with APD (an ``APDConfig``) or SPD (an ``SPDConfig``).

    ``data``: a Tensor of inputs (shuffled into batches of ``config.batch_size``), or an
    iterable of batches / a DataLoader. ``config``: its class picks the method; None: the model's
    own settings for ``method`` (``"apd"`` unless given; ``model.apd_default_config()`` /
    ``model.spd_default_config()``), or, when resuming, the checkpoint's. ``weights``: explicit
    weight descriptions; by default the model's ``apd_weight_specs()`` or an adapter's. Returns the
    trained decomposition (:class:`~apd_lens.methods.apd.decomposition.Decomposition` or
    :class:`~apd_lens.methods.spd.decomposition.SPDDecomposition`; its ``loss_history`` holds the
    logged terms).

    ``run_dir``: a directory that receives ``metrics.jsonl`` during training, the checkpoints and,
    at the end, the saved decomposition (``cfg.json``, ``components.safetensors``). It must not
    hold another run unless ``overwrite`` or ``resume``. ``checkpoint_every``: save a checkpoint
    every that many steps and at the end, keeping the newest ``keep_checkpoints`` (< 1: all).
    ``resume``: a checkpoint file, a run directory (its newest checkpoint) or ``True`` (the newest
    of ``run_dir``); the run continues to the same result as an uninterrupted one (bitwise on CPU;
    see :mod:`apd_lens.training.data` for which data can be resumed). ``wandb_project``: also log to
    Weights & Biases (off by default; ``wandb_kwargs`` go to ``wandb.init``).
    """
    ckpt, ckpt_path = None, None
    if resume is not None and resume is not False:
        ckpt_path = resolve_resume(resume, run_dir)
        ckpt = load_checkpoint(ckpt_path)
        if run_dir is None:
            run_dir = ckpt_path.parent.parent
    config = _resolve_config(model, config, method, ckpt, ckpt_path)
    chosen = method_of_config(config)
    if config.steps == 0 and ckpt is None:
        warnings.warn(
            "steps=0: no training step runs, so the returned decomposition is untrained (only the method's work "
            "before training is done, e.g. SPD's faithfulness warm-up); pass steps >= 1 to decompose",
            UntrainedWarning,
            stacklevel=2,
        )
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if checkpoint_every is not None and run_dir is None:
        raise ValueError("checkpoint_every needs run_dir (where to write the checkpoints)")
    if isinstance(data, Tensor):
        check_data_tensor(model, data)  # the whole data once, before anything is trained or written
    if run_dir is not None and ckpt is None:
        _clear_or_refuse_existing_run(Path(run_dir), overwrite)
    distributed.init_from_env(config.device)
    keep_freed_memory()
    model = model.to(distributed.resolve_device(config.device))
    specs = resolve_specs(model, weights, config.weights)
    if ckpt is not None:
        _check_resume_target(model, specs, ckpt, ckpt_path)
    torch.manual_seed(config.seed)
    decomposition = chosen.decomposition_class(model, specs, config)
    data_gen = torch.Generator().manual_seed(config.seed)
    step_gen = torch.Generator().manual_seed(config.seed + 1)
    batches = iterate_batches(data, config.batch_size, data_gen, distributed.resolve_device(config.device))
    optimizer = make_optimizer(decomposition.trainable_parameters(), config.lr)
    callbacks = decomposition.training_callbacks(optimizer)
    start_step = 0
    if ckpt is not None:
        start_step = _restore(ckpt, ckpt_path, decomposition, optimizer, batches, step_gen, callbacks)
    else:
        if checkpoint_every is not None and not batches.resumable:
            logger.warning("checkpoints of this run cannot be resumed exactly: %s", batches.reason)
        decomposition.before_training()
    recorder = RunRecorder(
        run_dir,
        decomposition,
        optimizer,
        batches,
        step_gen,
        checkpoint_every,
        keep_checkpoints,
        start_step,
        extra_state={name: cb.state_dict for name, cb in callbacks.items()},
    )
    if wandb_project is not None:
        recorder.start_wandb(wandb_project, wandb_kwargs or {})
    try:
        run_steps(
            decomposition, batches, optimizer, step_gen, start_step, after_step=recorder.after_step, callbacks=callbacks
        )
        recorder.finish()
    finally:
        recorder.close()
        for cb in callbacks.values():
            cb.close()
    return decomposition


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam over the component parameters: the fused kernel (one pass over each parameter instead
    of a chain of elementwise ops: ~5x faster on a 26M-parameter residual-MLP decomposition on
    CPU) where torch has it for these parameters, else the plain loop."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def run_steps(
    decomposition: DecompositionBase,
    batches,
    optimizer: torch.optim.Optimizer,
    step_gen: torch.Generator | None = None,
    start_step: int = 0,
    *,
    after_step: Callable[[int, dict[str, int | float] | None], None] | None = None,
    callbacks: dict[str, TrainingCallback] | None = None,
) -> None:
    """Run the optimization from ``start_step`` to ``config.steps``.

    ``step_gen``: the generator of each step's random draws (APD's output probes, SPD's mask
    sources). ``after_step(step, row)`` is called after every step; ``row`` is the logged row of
    that step (also appended to ``loss_history``) or None on steps that are not logged.
    ``callbacks``: the method's between-steps work (e.g. APD's component splitter).
    """
    cfg = decomposition.config
    callbacks = callbacks or {}
    step_fn = distributed.data_parallel_step(decomposition)
    show = cfg.progress and distributed.is_main_process()
    bar = tqdm(range(start_step, cfg.steps), disable=not show, desc=decomposition.method.upper(), dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.lr_schedule, cfg.lr_warmup_frac)
        x = distributed.shard(next(batches))
        terms = step_fn(x, step_gen, step)
        bad = [k for k, v in terms.items() if not torch.isfinite(v)]
        if bad:
            raise FloatingPointError(
                f"step {step}: non-finite loss term(s) {bad}: { {k: v.detach().item() for k, v in terms.items()} }"
            )
        optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        check_gradients(decomposition, step)
        apply_update(decomposition, optimizer)
        for cb in callbacks.values():
            cb.after_step(step, x)
        row = None
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            decomposition.check_target_unchanged(f" (found at step {step})")
            row = {"step": step, "lr": optimizer.param_groups[0]["lr"]}
            logged = {k: v.detach() for k, v in terms.items()}
            logged.update(decomposition.log_values(terms))
            row.update(distributed.mean_over_ranks(logged))
            decomposition.loss_history.append(row)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in terms})
        if after_step is not None:
            after_step(step, row)


def apply_update(decomposition: DecompositionBase, optimizer: torch.optim.Optimizer) -> None:
    """The parameter update of one step: the optimizer step, then the method's own after-update
    work (APD's ``unit_norm_A``)."""
    optimizer.step()
    decomposition.after_update()


def check_gradients(decomposition: DecompositionBase, step: int) -> None:
    """Raise, before the optimizer touches anything, if a trainable parameter's gradient is not finite."""
    named = [(n, p.grad) for n, p in decomposition.named_parameters() if not n.startswith("model.")]
    named = [(n, g) for n, g in named if g is not None]
    if not named:
        return
    norms = torch.stack([g.norm() for _, g in named])
    if bool(torch.isfinite(norms).all()):
        return
    bad = [n for (n, _), norm in zip(named, norms, strict=True) if not torch.isfinite(norm)]
    raise FloatingPointError(f"step {step}: non-finite gradient of {bad}; stopped before the update")


# ------------------------------------------------------------------------------ resuming
def _say_chosen_default(model: nn.Module, config: DecompositionConfig) -> None:
    """The log line of a call on a language model without a config: the recipe it chose."""
    from apd_lens.adapters import is_language_model

    if is_language_model(model):
        logger.warning(
            "decompose(%s, tokens) without a config: the language-model recipe, %s with the %r preset "
            "(%d weights, %d subcomponents, %d steps of batch %d); pass a config to choose another",
            type(model).__name__,
            method_of_config(config).name.upper(),
            config.extra.get("preset"),
            len(config.weights or ()),
            sum(config.n_subcomponents.values()) if isinstance(config.n_subcomponents, dict) else 0,
            config.steps,
            config.batch_size,
        )


def _resolve_config(
    model: nn.Module,
    config: DecompositionConfig | None,
    method: str | None,
    ckpt: dict | None,
    ckpt_path: Path | None,
) -> DecompositionConfig:
    if config is not None:
        chosen = method_of_config(config)  # a TypeError naming the known config classes otherwise
        if method is not None and get_method(method).name != chosen.name:
            raise ValueError(f"method={method!r} but the config is a {type(config).__name__} ({chosen.name})")
    if ckpt is None:
        if config is None:
            config = default_config(model, method)
            _say_chosen_default(model, config)
        config.validate()
        return config
    saved_as = get_method(saved_method(ckpt))
    if (
        config is not None
        and method_of_config(config).name != saved_as.name
        or (method is not None and get_method(method).name != saved_as.name)
    ):
        given = type(config).__name__ if config is not None else f"method={method!r}"
        raise ValueError(
            f"cannot resume {ckpt_path}: it is an {saved_as.name.upper()} run, and this call asks for {given}; "
            f"pass a {saved_as.config_class.__name__} or config=None"
        )
    saved = saved_as.config_class.from_dict(ckpt["config"])
    if config is None:
        return saved
    config.validate()
    mine, theirs = config.to_dict(), saved.to_dict()
    differ = [k for k in mine if k not in RESUME_MAY_CHANGE and mine[k] != theirs.get(k)]
    if differ:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r}, given {mine[k]!r}" for k in differ)
        raise ValueError(
            f"cannot resume {ckpt_path} with a different config ({detail}); pass config=None to use the checkpoint's"
        )
    return config


def _check_resume_target(model: nn.Module, specs: list[WeightSpec], ckpt: dict, ckpt_path: Path) -> None:
    saved_specs = [WeightSpec.from_dict(d) for d in ckpt["weights"]]
    if saved_specs != specs:
        raise ValueError(
            f"cannot resume {ckpt_path}: it decomposes {[s.name for s in saved_specs]} described as "
            f"{saved_specs}, this run {[s.name for s in specs]} described as {specs}"
        )
    check_target(f"the checkpoint {ckpt_path}", model, specs, ckpt["target"], ckpt["target_matrices"])


def _restore(
    ckpt: dict,
    ckpt_path: Path,
    decomposition: DecompositionBase,
    optimizer: torch.optim.Optimizer,
    batches: BatchStream,
    step_gen: torch.Generator,
    callbacks: dict[str, TrainingCallback],
) -> int:
    """Put the run back in the state saved in ``ckpt``; returns the number of completed steps."""
    decomposition.load_state_tensors(ckpt["components"], str(ckpt_path))
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{ckpt_path}: the optimizer state does not fit: {err}") from err
    batches.load_state_dict(ckpt["data"])
    step_gen.set_state(ckpt["probe_generator"])
    set_rng_state(ckpt["rng"])
    decomposition.loss_history = list(ckpt["loss_history"])
    for name, cb in callbacks.items():
        if name in ckpt:
            cb.load_state_dict(ckpt[name])
    logger.info("resumed %s at step %d", ckpt_path, ckpt["step"])
    return int(ckpt["step"])


def _clear_or_refuse_existing_run(run_dir: Path, overwrite: bool) -> None:
    """A fresh run must not mix with an older one in the same directory."""
    old = [run_dir / f for f in (CONFIG_FILE, COMPONENTS_FILE, METRICS_FILE) if (run_dir / f).exists()]
    old += list_checkpoints(run_dir)
    if old and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True to continue it, overwrite=True to replace "
            "it, or choose another run_dir"
        )
    for path in old:
        path.unlink()
