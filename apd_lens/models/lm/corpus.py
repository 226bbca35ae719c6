"""The Python standard library's own source as a text corpus, split into train / held-out by file.

The default corpus is the running interpreter's ``Lib/`` (``sysconfig.get_paths()["stdlib"]``):
every ``.py`` file outside the test folders and ``site-packages`` — real code nobody here wrote,
present on every machine, no download. Any other folder works the same way (``corpus_root``).

A file is held out when its relative path ranks among the lowest ~5% by sha256 (at least one
file), so the split depends only on the paths. The corpus's fingerprint — the Python version (for
the standard library), the number of files and a sha256 over the sorted (relative path, content)
pairs — lets a saved target refuse a corpus that differs from the one it was trained on.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import asdict, dataclass, replace
from pathlib import Path

SKIPPED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
"""Folders whose files are left out (any path component equal to one of these)."""

HELD_OUT_FRACTION = 0.05


def stdlib_root() -> Path:
    """The running interpreter's standard-library folder (``Lib/``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])


@dataclass(frozen=True)
class CorpusInfo:
    """What a corpus is: enough to recognise it again, and its size."""

    source: str
    """``"stdlib"`` or the folder it was read from."""
    python_version: str | None
    """The interpreter whose ``Lib/`` this is (None for another folder)."""
    n_files_train: int
    n_files_held_out: int
    n_chars: int
    sha256: str
    """sha256 over the sorted files: for each, its relative posix path, a NUL byte, its content
    (raw bytes), a NUL byte."""
    n_tokens_train: int | None = None
    n_tokens_held_out: int | None = None

    @property
    def n_files(self) -> int:
        return self.n_files_train + self.n_files_held_out

    def fingerprint(self) -> dict[str, str | int | None]:
        """What must match for a saved target to be reused on this corpus."""
        return {"python_version": self.python_version, "n_files": self.n_files, "sha256": self.sha256}

    def with_token_counts(self, n_train: int, n_held_out: int) -> CorpusInfo:
        return replace(self, n_tokens_train=n_train, n_tokens_held_out=n_held_out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CorpusInfo:
        return cls(**d)


@dataclass(frozen=True)
class Corpus:
    """The texts of each split, sorted by relative path, and the corpus's :class:`CorpusInfo`."""

    train: dict[str, str]
    held_out: dict[str, str]
    info: CorpusInfo


def corpus_files(root: str | Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside :data:`SKIPPED_FOLDERS`, sorted by relative path;
    raises when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {str(root)!r} does not exist or is not a folder")
    files = sorted(
        (p for p in root.rglob("*.py") if p.is_file() and not SKIPPED_FOLDERS & set(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise ValueError(
            f"corpus folder {str(root)!r} holds no .py files (outside {', '.join(sorted(SKIPPED_FOLDERS))})"
        )
    return files


def held_out_paths(relative_paths: list[str], fraction: float = HELD_OUT_FRACTION) -> set[str]:
    """The paths held out: the ``max(1, round(fraction * n))`` lowest by sha256 of the path."""
    if len(relative_paths) < 2:
        raise ValueError(f"a train / held-out split by file needs at least 2 files, got {len(relative_paths)}")
    ranked = sorted(relative_paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    return set(ranked[: max(1, round(fraction * len(relative_paths)))])


def load_corpus(corpus_root: str | Path | None = None) -> Corpus:
    """Read the corpus (default: the standard library), split it by file and fingerprint it."""
    root = stdlib_root() if corpus_root is None else Path(corpus_root)
    files = corpus_files(root)
    raw = {p.relative_to(root).as_posix(): p.read_bytes() for p in files}
    digest = hashlib.sha256()
    for rel, content in raw.items():  # already sorted by relative path
        digest.update(rel.encode() + b"\0" + content + b"\0")
    texts = {rel: content.decode("utf-8", errors="replace") for rel, content in raw.items()}
    held = held_out_paths(list(texts))
    is_stdlib = corpus_root is None or root.resolve() == stdlib_root().resolve()
    info = CorpusInfo(
        source="stdlib" if is_stdlib else str(root),
        python_version=python_version() if is_stdlib else None,
        n_files_train=len(texts) - len(held),
        n_files_held_out=len(held),
        n_chars=sum(len(t) for t in texts.values()),
        sha256=digest.hexdigest(),
    )
    return Corpus(
        train={r: t for r, t in texts.items() if r not in held},
        held_out={r: t for r, t in texts.items() if r in held},
        info=info,
    )


def fingerprint_differences(saved: CorpusInfo, current: CorpusInfo) -> list[str]:
    """One line per fingerprint field that differs (empty when the corpora match)."""
    before, now = saved.fingerprint(), current.fingerprint()
    return [f"{key}: saved {before[key]!r}, now {now[key]!r}" for key in before if before[key] != now[key]]
