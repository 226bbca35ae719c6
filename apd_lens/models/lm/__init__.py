"""A real language model to decompose: a small HookedTransformer trained on real text, no download.

The target
----------
The corpus is the running interpreter's own standard library (``Lib/``, the ``.py`` files outside
the test folders: ~730 files, ~12 M characters on Python 3.11), split into train / held-out by
file (:mod:`~apd_lens.models.lm.corpus`). A byte-level BPE tokenizer of 4096 tokens is trained on
the train split (:mod:`~apd_lens.models.lm.tokenizer`), and a 2-layer HookedTransformer (d_model
128, 4 heads, d_mlp 512, n_ctx 128, GELU, folded pre-norms ``LNPre``) is trained on random
windows of the token stream (:mod:`~apd_lens.models.lm.training`). It is saved to a folder (cfg +
safetensors + tokenizer) and reused; a corpus with another fingerprint (Python version, file
count, content hash) is refused (:mod:`~apd_lens.models.lm.target`)::

    from apd_lens.models.lm import load_or_train_lm_target

    target = load_or_train_lm_target("runs/lm_target")  # trains once, then loads
    target.model, target.tokenizer, target.train_tokens, target.held_out_tokens  # windows [n, n_ctx]

or from the command line: ``python -m apd_lens.models.lm.target --out runs/lm_target``.

Any other HookedTransformer
---------------------------
Nothing in the decomposition is specific to this target: any HookedTransformer whose norms are
folded works the same way. With a pretrained model whose weights you have (not run here: it
downloads)::

    from transformer_lens import HookedTransformer
    import apd_lens

    model = HookedTransformer.from_pretrained("gpt2")      # folds the norms by default: cfg.normalization_type "LNPre"
    tokens = model.to_tokens(texts)[:, : model.cfg.n_ctx]  # int64 ids [batch, pos]
    decomposition = apd_lens.decompose(model, tokens)

A model loaded without processing (``from_pretrained_no_processing``, or built with ``"LN"``)
is refused until its norms are folded: ``apd_lens.adapters.hooked_transformer.fold_norms(model)``.
Token data are checked before training: ids must be integers in ``[0, d_vocab)`` and sequences
at most ``n_ctx`` long (:func:`apd_lens.adapters.tokens.check_tokens`).
"""

from apd_lens.models.lm.corpus import Corpus, CorpusInfo, load_corpus

_FROM_TARGET = ("CorpusMismatchError", "LMTarget", "LMTargetConfig", "load_or_train_lm_target")


def __getattr__(name: str):
    """The target's names, imported on first use (so ``python -m apd_lens.models.lm.target`` runs
    the module once)."""
    if name in _FROM_TARGET:
        from apd_lens.models.lm import target

        return getattr(target, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Corpus",
    "CorpusInfo",
    "CorpusMismatchError",
    "LMTarget",
    "LMTargetConfig",
    "load_corpus",
    "load_or_train_lm_target",
]
