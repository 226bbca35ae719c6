"""The language-model target: a small HookedTransformer trained on the standard library's source,
saved to a folder and reused by later runs.

A saved target is a folder with ``cfg.json`` (the model and training settings, the corpus's
:class:`~apd_lens.models.lm.corpus.CorpusInfo` with token counts, the held-out CE, the parameter
count, tokens seen, training wall time), ``model.safetensors``, ``tokenizer.json`` and
``tokens.safetensors`` (the tokenized corpus, so that a reuse does not tokenize again).
:func:`load_or_train_lm_target` reuses it when the current corpus has the same fingerprint and
refuses, leaving the folder as it is, when it does not.

Command line: ``python -m apd_lens.models.lm.target --out runs/lm_target [--steps N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from safetensors.torch import save as st_save
from torch import Tensor, nn

from apd_lens.io import atomic_write_bytes, read_tensors
from apd_lens.models.hooked_transformer_target import build_hooked_transformer
from apd_lens.models.lm.corpus import Corpus, CorpusInfo, fingerprint_differences, load_corpus
from apd_lens.models.lm.tokenizer import cut_windows, encode_files, load_tokenizer, train_tokenizer
from apd_lens.models.lm.training import held_out_ce, train_lm

CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE = "cfg.json", "model.safetensors", "tokenizer.json"
TOKENS_FILE = "tokens.safetensors"
"""The corpus's token streams (int32), so that a reuse need not tokenize again."""
RECORD_KIND = "apd_lens.lm_target"

DEFAULT_STEPS = 2000
"""8.2M tokens seen (~2.6 passes over the 3.2M train tokens of Python 3.11's stdlib). A step of 32 x 128
tokens took 0.5-0.8 s on 1 thread of a shared 2-core machine: <= ~17 min at 1 thread, less at 2."""


class CorpusMismatchError(ValueError):
    """The corpus differs from the one a saved target was trained on."""


@dataclass(frozen=True)
class LMTargetConfig:
    """The model's shape and how it is trained. The model is a pre-norm HookedTransformer with
    folded norms (``LNPre``), which is what the decomposition adapter needs."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_ctx: int = 128
    act_fn: str = "gelu"
    vocab_size: int = 4096
    """The BPE tokenizer's size (= the model's d_vocab)."""
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_frac: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        small = {
            k: getattr(self, k) for k in ("n_layers", "d_mlp", "n_ctx", "steps", "batch_size") if getattr(self, k) < 1
        }
        if small:
            raise ValueError(f"these settings must be >= 1: {small}")

    def model_fields(self, d_vocab: int) -> dict[str, Any]:
        """The HookedTransformerConfig fields (besides LNPre and d_head, which the builder sets)."""
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "d_mlp": self.d_mlp,
            "n_ctx": self.n_ctx,
            "d_vocab": d_vocab,
            "act_fn": self.act_fn,
            "seed": self.seed,
        }

    def differences(self, other: LMTargetConfig) -> list[str]:
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: saved {mine[k]!r}, given {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]


@dataclass
class LMTarget:
    """A trained (or loaded) language-model target and its data."""

    model: nn.Module
    """The HookedTransformer (frozen: ``requires_grad`` off)."""
    tokenizer: Any
    """The ``tokenizers.Tokenizer`` it reads."""
    train_tokens: Int[Tensor, "n_train n_ctx"]
    """The train split as consecutive windows of n_ctx tokens (int64)."""
    held_out_tokens: Int[Tensor, "n_held_out n_ctx"]
    """The held-out split, likewise."""
    record: dict[str, Any]
    """The saved ``cfg.json``."""
    trained_now: bool
    """Whether this call trained it (False: loaded from the folder)."""

    @property
    def corpus(self) -> CorpusInfo:
        return CorpusInfo.from_dict(self.record["corpus"])

    @property
    def held_out_ce(self) -> float:
        return self.record["held_out_ce"]


def build_lm(config: LMTargetConfig, d_vocab: int) -> nn.Module:
    """An untrained HookedTransformer of ``config``'s shape."""
    return build_hooked_transformer("language-model target", **config.model_fields(d_vocab))


def load_or_train_lm_target(
    folder: str | Path,
    corpus_root: str | Path | None = None,
    config: LMTargetConfig | None = None,
    *,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> LMTarget:
    """The target saved in ``folder``, or a new one trained on the corpus and saved there.

    ``corpus_root``: the corpus folder (default: the standard library, see
    :mod:`~apd_lens.models.lm.corpus`). ``config``: the model and training settings (default
    :class:`LMTargetConfig`; when a target is saved, None means its own and anything else must
    match it). Raises :class:`CorpusMismatchError` when the corpus's fingerprint differs from the
    saved one; the folder is never changed then.
    """
    folder = Path(folder)
    corpus = load_corpus(corpus_root)
    if (folder / CONFIG_FILE).is_file():
        return _load(folder, corpus, config, device)
    return _train_and_save(folder, corpus, config or LMTargetConfig(), progress, device)


def _train_and_save(
    folder: Path, corpus: Corpus, config: LMTargetConfig, progress: bool, device: str | torch.device
) -> LMTarget:
    start = time.perf_counter()
    tokenizer = train_tokenizer(corpus.train.values(), config.vocab_size)
    train_stream = encode_files(tokenizer, corpus.train.values())
    held_out_stream = encode_files(tokenizer, corpus.held_out.values())
    tokenize_seconds = time.perf_counter() - start
    held_out = cut_windows(held_out_stream, config.n_ctx)
    model = build_lm(config, tokenizer.get_vocab_size()).to(device)
    start = time.perf_counter()
    history = train_lm(
        model,
        train_stream,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_frac=config.warmup_frac,
        seed=config.seed,
        progress=progress,
    )
    train_seconds = time.perf_counter() - start
    model.eval()
    record = {
        "kind": RECORD_KIND,
        "config": asdict(config),
        "model": {**config.model_fields(tokenizer.get_vocab_size()), "normalization_type": "LNPre"},
        "corpus": corpus.info.with_token_counts(train_stream.shape[0], held_out_stream.shape[0]).to_dict(),
        "held_out_ce": held_out_ce(model, held_out),
        "n_params": sum(p.numel() for p in model.parameters()),
        "tokens_seen": config.steps * config.batch_size * config.n_ctx,
        "train_seconds": round(train_seconds, 1),
        "tokenize_seconds": round(tokenize_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "train_loss_every_100_steps": [round(v, 4) for v in history],
    }
    save_lm_target(folder, model, tokenizer, record, {"train": train_stream, "held_out": held_out_stream})
    return LMTarget(model, tokenizer, cut_windows(train_stream, config.n_ctx), held_out, record, trained_now=True)


def save_lm_target(
    folder: str | Path, model: nn.Module, tokenizer, record: dict[str, Any], streams: dict[str, Tensor]
) -> Path:
    """Write the weights, the tokenizer, the token ``streams`` (``"train"``, ``"held_out"``) and,
    last (it marks the folder complete), ``cfg.json``."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(folder / MODEL_FILE, st_save(tensors))
    atomic_write_bytes(folder / TOKENIZER_FILE, tokenizer.to_str().encode())
    atomic_write_bytes(folder / TOKENS_FILE, st_save({k: v.to(torch.int32).contiguous() for k, v in streams.items()}))
    atomic_write_bytes(folder / CONFIG_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return folder


def read_lm_record(folder: str | Path) -> dict[str, Any]:
    """The parsed ``cfg.json`` of a saved target, with a clear error for anything else."""
    file = Path(folder) / CONFIG_FILE
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if record.get("kind") != RECORD_KIND:
        raise ValueError(f"{file} is not a saved language-model target (kind {record.get('kind')!r})")
    return record


def _load(folder: Path, corpus: Corpus, config: LMTargetConfig | None, device: str | torch.device) -> LMTarget:
    record = read_lm_record(folder)
    saved_info = CorpusInfo.from_dict(record["corpus"])
    problems = fingerprint_differences(saved_info, corpus.info)
    if problems:
        raise CorpusMismatchError(
            f"the target in {folder} was trained on another corpus (source {saved_info.source!r}, "
            f"{saved_info.n_files} files) than this one (source {corpus.info.source!r}, {corpus.info.n_files} "
            "files):\n  - " + "\n  - ".join(problems) + "\nthe saved target is left as it is; train into another "
            "folder, or run with the corpus it was trained on"
        )
    saved_config = LMTargetConfig(**{f.name: record["config"][f.name] for f in fields(LMTargetConfig)})
    if config is not None and config != saved_config:
        raise ValueError(
            f"the target in {folder} was trained with other settings:\n  - "
            + "\n  - ".join(saved_config.differences(config))
            + "\npass config=None to use the saved target, or train into another folder"
        )
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    model = build_lm(saved_config, record["model"]["d_vocab"])
    model.load_state_dict(read_tensors(folder / MODEL_FILE), strict=True)
    model.to(device).eval().requires_grad_(False)
    streams = _saved_streams(folder, saved_info)
    if streams is None:  # written without them, or damaged: tokenize again
        streams = {split: encode_files(tokenizer, getattr(corpus, split).values()) for split in ("train", "held_out")}
    train, held_out = (cut_windows(streams[split], saved_config.n_ctx) for split in ("train", "held_out"))
    return LMTarget(model, tokenizer, train, held_out, record, trained_now=False)


def _saved_streams(folder: Path, info: CorpusInfo) -> dict[str, Tensor] | None:
    """The saved token streams (int64) when present and of the recorded lengths, else None."""
    try:
        streams = read_tensors(folder / TOKENS_FILE)
    except (FileNotFoundError, ValueError):
        return None
    lengths = {"train": info.n_tokens_train, "held_out": info.n_tokens_held_out}
    if {k: v.shape for k, v in streams.items()} != {k: (n,) for k, n in lengths.items()}:
        return None
    return {k: v.to(torch.int64) for k, v in streams.items()}


def summary(target: LMTarget) -> str:
    """A few lines: corpus, size, held-out CE, tokens seen, training time."""
    r, c, m = target.record, target.corpus, target.record["model"]
    return "\n".join(
        [
            f"corpus: {c.source} (Python {c.python_version}), {c.n_files_train} + {c.n_files_held_out} files "
            f"(train + held-out), {c.n_chars:,} characters, {c.n_tokens_train:,} + {c.n_tokens_held_out:,} tokens, "
            f"sha256 {c.sha256[:16]}...",
            f"model: {m['n_layers']} layers, d_model {m['d_model']}, d_vocab {m['d_vocab']}, n_ctx {m['n_ctx']}, "
            f"{r['n_params']:,} parameters",
            f"trained {r['config']['steps']} steps, {r['tokens_seen']:,} tokens seen, {r['train_seconds']:.0f} s "
            f"(tokenizer + tokenizing {r['tokenize_seconds']:.0f} s; torch threads: {r['torch_threads']})",
            f"held-out CE: {r['held_out_ce']:.4f} nats/token",
        ]
    )


def main(argv: list[str] | None = None) -> LMTarget:
    parser = argparse.ArgumentParser(description="Train (or load) the language-model target on the stdlib's source.")
    parser.add_argument("--out", required=True, help="the target's folder (reused when it holds one)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEFAULT_STEPS})")
    parser.add_argument("--threads", type=int, default=None, help="torch and tokenizer threads (default: torch's)")
    parser.add_argument("--corpus", default=None, help="a corpus folder (default: the standard library)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # the tokenizer's thread pool
    config = None if args.steps is None else LMTargetConfig(steps=args.steps)
    target = load_or_train_lm_target(args.out, args.corpus, config, progress=not args.no_progress, device=args.device)
    print(("trained and saved to " if target.trained_now else "loaded from ") + args.out)
    print(summary(target))
    return target


if __name__ == "__main__":
    main()
