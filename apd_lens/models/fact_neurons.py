"""Which MLP neuron carries each fact of a fact-lookup target, and splitting a neuron two facts share.

A decomposition can give a fact a mechanism of its own only if the target stores it apart from the
other facts: two facts pushed by the same single neuron share that neuron's row of ``W_out``, and no
component can split it between them. :func:`shared_fact_neurons` finds such neurons;
:func:`split_neuron` copies one into an unused neuron (halving both output rows, so the function is
unchanged up to a small perturbation of the copy's input weights), after which training with the
overlap penalty moves each fact onto one of the two (see ``train_fact_lookup``'s ``repair_steps``).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from apd_lens.models.fact_task import FactLookupTask

_POST = "blocks.0.mlp.hook_post"


@torch.no_grad()
def fact_neuron_push(model, task: FactLookupTask) -> Float[Tensor, "n_facts d_mlp"]:
    """Each neuron's direct push, at a fact's SEP position, of the fact's value logit above the mean
    logit: the neuron's activation times ``(W_out W_U)[n, value] - mean_v (W_out W_U)[n, v]``."""
    _, cache = model.run_with_cache(task.sequences(), names_filter=_POST)
    acts = cache[_POST][:, -1]
    logit_effect = model.blocks[0].mlp.W_out @ model.W_U  # [d_mlp, d_vocab]
    relative = logit_effect - logit_effect.mean(-1, keepdim=True)
    return acts * relative[:, task.values()].T


def main_fact_neurons(model, task: FactLookupTask) -> list[int]:
    """Per fact, its main neuron: the one with the largest push (:func:`fact_neuron_push`)."""
    return fact_neuron_push(model, task).argmax(-1).tolist()


def shared_fact_neurons(model, task: FactLookupTask, main: list[int] | None = None) -> dict[int, list[int]]:
    """Neurons that are the main neuron of more than one fact, each with those facts (``main``: the
    facts' main neurons when already computed, :func:`main_fact_neurons`)."""
    facts_of: dict[int, list[int]] = {}
    for fact, neuron in enumerate(main_fact_neurons(model, task) if main is None else main):
        facts_of.setdefault(neuron, []).append(fact)
    return {neuron: facts for neuron, facts in facts_of.items() if len(facts) > 1}


@torch.no_grad()
def least_used_neurons(model, task: FactLookupTask, exclude: set[int]) -> list[int]:
    """Neurons outside ``exclude`` ordered by their total absolute activation over every fact and
    position, least used first."""
    _, cache = model.run_with_cache(task.sequences(), names_filter=_POST)
    use = cache[_POST].abs().sum((0, 1))
    return [n for n in use.argsort().tolist() if n not in exclude]


@torch.no_grad()
def split_neuron(model, neuron: int, into: int, noise: float = 0.1, generator: torch.Generator | None = None) -> None:
    """Make neuron ``into`` a copy of ``neuron`` and give each half of ``neuron``'s output weights.

    The copy's input weights get Gaussian noise of norm about ``noise`` times ``neuron``'s input-weight
    norm, so that training can pull the two apart. Whatever ``into`` did before is overwritten: pick
    an unused neuron (:func:`least_used_neurons`), and with ``noise=0`` the function is unchanged.
    """
    if neuron == into:
        raise ValueError(f"cannot split neuron {neuron} into itself")
    mlp = model.blocks[0].mlp
    d_model = mlp.W_in.shape[0]
    jitter = torch.randn(d_model, generator=generator, dtype=mlp.W_in.dtype) / d_model**0.5
    mlp.W_in[:, into] = mlp.W_in[:, neuron] + noise * mlp.W_in[:, neuron].norm() * jitter.to(mlp.W_in.device)
    mlp.b_in[into] = mlp.b_in[neuron]
    mlp.W_out[neuron] /= 2
    mlp.W_out[into] = mlp.W_out[neuron]
