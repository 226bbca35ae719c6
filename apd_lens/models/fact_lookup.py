"""A one-layer transformer trained on a synthetic key -> value fact lookup task.

Each sequence is ``[key, SEP]``; the model must predict ``SEP`` after the key and the key's value
after ``SEP``. Key ``i`` maps to value ``n_facts + perm[i]`` (a fixed random bijection), so every
fact is one mechanism: attention moves the key to the SEP position and the MLP looks its value up
(the residual stream is too narrow for a linear key -> value map).
Built from a config (no downloads) as a TransformerLens HookedTransformer (TL 3.x).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from apd_lens.analysis.ownership import own_subcomponents
from apd_lens.engine.losses import output_loss
from apd_lens.methods.apd.config import APDConfig
from apd_lens.methods.spd.config import SPDConfig
from apd_lens.models.fact_neurons import least_used_neurons, main_fact_neurons, shared_fact_neurons, split_neuron
from apd_lens.models.fact_task import FactLookupTask
from apd_lens.models.hooked_transformer_target import build_hooked_transformer
from apd_lens.models.target_training import train_target


def make_fact_lookup_model(task: FactLookupTask, d_model: int = 8, d_mlp: int = 48, n_heads: int = 2, seed: int = 0):
    """A 1-layer HookedTransformer (LNPre, learned positions) sized for the task.

    ``d_model`` is kept well below ``n_facts`` so that no linear path (embed -> attention OV ->
    unembed) can map every key to its value: the lookup has to happen in the MLP.
    """
    return build_hooked_transformer(
        "fact-lookup",
        n_layers=1,
        d_model=d_model,
        n_heads=n_heads,
        d_mlp=d_mlp,
        d_vocab=task.d_vocab,
        n_ctx=2,
        act_fn="relu",
        seed=seed,
    )


def train_fact_lookup(
    model,
    task: FactLookupTask,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    act_l1: float = 0.0,
    ablated_coeff: float = 0.0,
    overlap_coeff: float = 0.0,
    ramp_frac: float = 0.0,
    repair_steps: int = 0,
    max_repairs: int = 3,
    progress=True,
) -> list[float]:
    """Cross-entropy on both positions (AdamW, wd 0.01, cosine schedule), plus ``act_l1`` times the
    mean L1 norm of the MLP's post-activations (sparse neurons: each fact uses few of them), plus
    ``ablated_coeff`` times a hinge loss on the margin (plus 1) of the right value over the best
    wrong one after SEP with every MLP neuron at SEP zeroed (the lookup must happen in the MLP at
    SEP, not bypass it through the attention or the MLP at the key position), plus
    ``overlap_coeff`` times the mean cosine similarity, over pairs of examples with different keys,
    of the neurons' contributions after SEP (activation times the norm of the neuron's output
    weights): each fact gets neurons of its own, weak facts as much as strong ones. The overlap
    coefficient ramps up linearly over the first ``ramp_frac`` of the steps (neurons first learn
    the task, then specialize).

    With ``repair_steps``, after training: while some neuron is the main neuron of two facts
    (:func:`~apd_lens.models.fact_neurons.shared_fact_neurons`, at most ``max_repairs`` rounds),
    split each such neuron into the least-used neuron and train ``repair_steps`` more steps at
    ``lr / 3`` with the full overlap penalty (a warning if a neuron is still shared after the last
    round). Returns the loss every 100 steps of every phase."""
    if repair_steps < 0 or max_repairs < 1:
        raise ValueError(f"repair_steps must be >= 0 and max_repairs >= 1, got {repair_steps} and {max_repairs}")
    if repair_steps and not overlap_coeff:
        raise ValueError("repair_steps needs overlap_coeff > 0: the overlap penalty is what pulls a split neuron apart")
    gen = torch.Generator().manual_seed(seed)
    post: dict[str, Tensor] = {}

    def batches():
        while True:
            keys = task.sample_keys(batch_size, gen)
            post["x"] = task.sequences(keys)
            post["step"] = post.get("step", -1) + 1
            yield post["x"], task.targets(keys)

    def loss_fn(logits: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if act_l1:
            loss = loss + act_l1 * post["acts"].abs().sum(-1).mean()
        if overlap_coeff:
            contrib = post["acts"][:, -1] * model.blocks[0].mlp.W_out.norm(dim=-1)
            direction = contrib / (contrib.norm(dim=-1, keepdim=True) + 1e-6)
            keys = post["x"][:, 0]
            other = keys[:, None] != keys[None, :]
            ramp = min(1.0, post["step"] / (post["ramp_frac"] * post["steps"])) if post["ramp_frac"] else 1.0
            loss = loss + ramp * overlap_coeff * (direction @ direction.T)[other].mean()
        if ablated_coeff:
            with model.hooks(fwd_hooks=[("blocks.0.mlp.hook_post", _zero_at_sep)]):
                ablated = model(post["x"])[:, -1, task.n_facts : 2 * task.n_facts]
            right = F.one_hot(y[:, -1] - task.n_facts, task.n_facts).bool()
            margin = ablated[right] - ablated.masked_fill(right, float("-inf")).max(-1).values
            loss = loss + ablated_coeff * F.relu(margin + 1).mean()
        return loss

    def keep(t: Tensor, hook) -> None:
        post["acts"] = t

    trainable = [p for p in model.parameters() if p.requires_grad]  # train_target freezes them when done

    def train(n_steps: int, phase_lr: float, phase_ramp_frac: float) -> list[float]:
        post.update(steps=n_steps, step=-1, ramp_frac=phase_ramp_frac)
        for p in trainable:
            p.requires_grad_(True)
        return train_target(
            model, batches(), loss_fn, n_steps, phase_lr, schedule="cosine", warmup_frac=0.02, progress=progress
        )

    model.add_hook("blocks.0.mlp.hook_post", keep)
    try:
        history = train(steps, lr, ramp_frac)
        rounds = max_repairs if repair_steps else 0
        main = main_fact_neurons(model, task) if rounds else []
        shared = shared_fact_neurons(model, task, main)
        for _ in range(rounds):
            if not shared:
                break
            spare = least_used_neurons(model, task, exclude=set(main))
            if len(spare) < len(shared):
                raise RuntimeError(f"{len(shared)} shared fact neurons, only {len(spare)} other neurons to split into")
            for neuron, into in zip(shared, spare, strict=False):
                split_neuron(model, neuron, into, generator=gen)
            history += train(repair_steps, lr / 3, 0.0)  # the full overlap penalty from the start
            main = main_fact_neurons(model, task)
            shared = shared_fact_neurons(model, task, main)
        if rounds and shared:
            warnings.warn(f"{rounds} repair rounds left neurons carrying several facts: {shared}", stacklevel=2)
        return history
    finally:
        model.reset_hooks()


def _zero_at_sep(t: Tensor, hook) -> Tensor:
    return torch.cat([t[:, :-1], torch.zeros_like(t[:, -1:])], dim=1)


@torch.no_grad()
def mlp_dependence(model, task: FactLookupTask) -> float:
    """Fraction of facts the model gets wrong when the MLP output is zeroed (how much it needs the MLP)."""
    x = task.sequences()
    logits = model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: torch.zeros_like(t))])
    return (logits[:, -1].argmax(-1) != task.values()).float().mean().item()


@torch.no_grad()
def fact_accuracy(model, task: FactLookupTask) -> float:
    """Fraction of facts whose value is the argmax after SEP."""
    logits = model(task.sequences())
    return (logits[:, -1].argmax(-1) == task.values()).float().mean().item()


def fact_lookup_apd_config(task: FactLookupTask, **changes) -> APDConfig:
    """Settings for decomposing the MLP of the fact-lookup model: KL output, a strong faithfulness
    term, reconstruction of the MLP's post-activations, and component splitting (tuned on the
    24-fact target of ``examples/transformer.py``)."""
    base = dict(
        n_components=task.n_facts + 8,
        rank=1,
        topk=0.75,
        attribution="gradient",
        attribution_source="components",
        faithfulness_coeff=1000.0,
        minimality_coeff=100.0,
        simplicity_coeff=10.0,
        act_recon_coeff=1000.0,
        act_recon_hooks=("blocks.0.mlp.hook_post",),
        split_every=300,
        split_unused=0.25,  # with 0.01: 19/24 facts, two merged pairs never found a spare component that idle
        schatten_p=0.9,
        unit_norm_A=True,
        lr_warmup_frac=0.01,
        steps=12000,
    )
    return _fact_lookup_config(APDConfig, task, base, changes)


def fact_lookup_spd_config(task: FactLookupTask, **changes) -> SPDConfig:
    """SPD settings for the fact-lookup model's MLP (``blocks.0.mlp.W_in`` and ``W_out``): KL output
    distance, tokens as data points, C per matrix 8 per fact plus 8 (200 for 24 facts), binomial masks, CI
    functions that read the whole input (``vector_mlp``), importance 1e-3 with p 1 and the reference's frequency
    term (``importance_beta`` 0.1: a subcomponent on for two facts costs more than two on for one each), lr 3e-3
    cosine, 20k steps. On the 24-fact targets of seeds 0-4: 24 / 23 / 22 / 13 / 17 facts with their own subcomponent
    (30k steps: 24 / 24 / 21 / 19 / 18; without the frequency term: 24 / 22 / 17; at lr 2e-3: 22 / 18; the paper's
    per-subcomponent ``mlp``: 17 / 14; that with C 64 and continuous masks: 13 / 6; docs/results.md)."""
    base = dict(
        lr=3e-3,
        n_subcomponents=8 * task.n_facts + 8,
        sampling="binomial",
        importance_minimality_coeff=1e-3,
        importance_p=1.0,
        importance_beta=0.1,
        ci_fn="vector_mlp",
        ci_hidden=16,
        steps=20_000,
    )
    return _fact_lookup_config(SPDConfig, task, base, changes)


def _fact_lookup_config(config_class, task: FactLookupTask, settings: dict, changes: dict):
    """The settings both methods share for the fact-lookup MLP (KL output distance, Adam 2e-3 cosine,
    128 sequences per batch, W_in and W_out), then the method's own ``settings``, then ``changes``."""
    shared = dict(
        output_loss="kl",
        lr=2e-3,
        lr_schedule="cosine",
        batch_size=128,
        weights=("blocks.0.mlp.W_in", "blocks.0.mlp.W_out"),
        extra={"experiment": f"fact-lookup-{task.n_facts}"},
    )
    return config_class(**{**shared, **settings, **changes})


@dataclass
class FactsOwn:
    """Which W_in subcomponent carries each fact (see :func:`facts_with_own_subcomponent`)."""

    n_own: int
    top: list[int]
    """Per fact, the W_in subcomponent with the largest causal importance at its SEP position."""
    own: list[bool]


@torch.no_grad()
def facts_with_own_subcomponent(
    decomposition, task: FactLookupTask, weight: str = "blocks.0.mlp.W_in", on: float = 0.5, off: float = 0.1
) -> FactsOwn:
    """How many facts have a subcomponent of their own in an SPD decomposition: the ``weight``
    subcomponent with the largest causal importance at the fact's SEP position has CI >= ``on``
    there and < ``off`` at every other fact's SEP position."""
    if not hasattr(decomposition, "causal_importances"):
        raise TypeError(f"FACTS_OWN needs an SPD decomposition, got {type(decomposition).__name__}")
    ci = decomposition.causal_importances(task.sequences())
    if weight not in ci:
        raise ValueError(f"{weight!r} is not decomposed; the decomposition's sites are {sorted(ci)}")
    ci = ci[weight][:, -1]  # [n_facts, C]
    facts = torch.arange(task.n_facts, device=ci.device)
    ownership = own_subcomponents(ci, facts, facts, on, off)
    return FactsOwn(ownership.n_own, ownership.top.tolist(), ownership.own.tolist())


@torch.no_grad()
def stochastic_recon_kl(decomposition, target, task: FactLookupTask, n_samples: int = 16) -> float:
    """KL(target || stochastic-masked decomposition) over every fact and position, averaged over
    ``n_samples`` draws of the masks."""
    x = task.sequences()
    reference = target(x)
    ci = decomposition.causal_importances(x)
    kls = [
        output_loss(decomposition(x, decomposition.sample_masks(ci)), reference, "kl").item() for _ in range(n_samples)
    ]
    return sum(kls) / n_samples


@dataclass
class FactAssignment:
    """Which component carries each fact (see :func:`dedicated_facts`)."""

    n_dedicated: int
    own: list[int]
    """Per fact, its highest-attributed component at SEP outside the shared ones."""
    dedicated: list[bool]
    shared: list[int]
    """Components active (batch top-k) at SEP for more than ``shared_frac`` of the facts."""


@torch.no_grad()
def dedicated_facts(decomposition, task: FactLookupTask, shared_frac: float = 0.5) -> FactAssignment:
    """How many facts get their own component.

    At the SEP position, components in the batch top-k mask of more than ``shared_frac`` of the
    facts are shared mechanisms (e.g. the response to SEP itself). A fact's own component is its
    highest-attributed non-shared one. The fact is dedicated when (1) no other fact has the same
    own component, (2) the shared components plus its own make the model predict its value, and
    (3) the shared components alone do not (all components stay on at the key position).
    """
    x = task.sequences()
    n_comp = decomposition.n_components
    attributions = decomposition.attributions(x)[:, -1]  # [n_facts, C]
    active = decomposition.topk_mask(x)[:, -1]
    shared = active.mean(0) > shared_frac
    own = attributions.masked_fill(shared, float("-inf")).argmax(-1)

    def predicts_value(sep_mask: Tensor) -> Tensor:
        mask = torch.ones(*x.shape, n_comp)
        mask[:, -1] = sep_mask
        return decomposition(x, mask)[:, -1].argmax(-1) == task.values()

    base = shared.float().expand(task.n_facts, n_comp)
    with_own = predicts_value((base + F.one_hot(own, n_comp)).clamp(max=1))
    without_own = predicts_value(base)
    unique = torch.bincount(own, minlength=n_comp)[own] == 1
    dedicated = unique & with_own & ~without_own
    return FactAssignment(int(dedicated.sum()), own.tolist(), dedicated.tolist(), shared.nonzero().flatten().tolist())
