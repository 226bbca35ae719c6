"""The ```python blocks of README.md, docs/api.md and docs/design.md run as written.

Design: every block is its own test and runs alone, in a fresh ``sys.executable -c`` subprocess whose
working directory is an empty temporary directory, with ``PYTHONPATH`` set to the repository root and a
timeout of 120 s. Blocks share no state: a block that needs a model, a run directory or a saved
decomposition creates it itself (with a small step count), so each one can be copied and run on its own.
A block is skipped, with its reason, only when the line right before its opening fence is
``<!-- not-run: reason -->`` (e.g. a block that uses placeholder names such as ``my_model``).

The subprocesses run with ``OMP_NUM_THREADS=1`` (one torch thread: on a shared 2-core machine two
threads are many times slower under contention, and the test stays light) and ``MPLBACKEND=Agg``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "docs/api.md", "docs/design.md")
TIMEOUT_S = 120
NOT_RUN = re.compile(r"^<!--\s*not-run:\s*(?P<reason>.*?)\s*-->$")
FENCE = re.compile(r"^```")


@dataclass(frozen=True)
class Block:
    document: str
    line: int  # 1-based line of the opening fence
    code: str
    skip_reason: str | None

    @property
    def id(self) -> str:
        return f"{self.document}:{self.line}"


def extract_blocks(document: str) -> list[Block]:
    """Every ```python block of ``document`` (relative to the repository root), in order."""
    lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not FENCE.match(lines[i]):
            i += 1
            continue
        is_python = lines[i].strip() == "```python"
        start = i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        if i == len(lines):
            raise AssertionError(f"{document}:{start + 1}: code fence is never closed")
        if is_python:
            marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
            code = "\n".join(lines[start + 1 : i]) + "\n"
            blocks.append(Block(document, start + 1, code, marker.group("reason") if marker else None))
        i += 1
    return blocks


BLOCKS = [block for document in DOCUMENTS for block in extract_blocks(document)]


def readable(stream: str, limit: int = 6000) -> str:
    """The end of a subprocess's output, with each progress-bar line reduced to its last state."""
    text = "\n".join(line.split("\r")[-1] for line in stream.splitlines())
    return text[-limit:]


def test_blocks_found_and_markers_attached():
    assert {b.document for b in BLOCKS} == set(DOCUMENTS)
    assert sum(b.skip_reason is None for b in BLOCKS) >= 5, [b.id for b in BLOCKS]
    for document in DOCUMENTS:
        lines = (ROOT / document).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines):
            if NOT_RUN.match(line.strip()):
                following = lines[n + 1].strip() if n + 1 < len(lines) else ""
                assert following == "```python", f"{document}:{n + 1}: not-run marker is not right before a block"


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_code_block_runs(block: Block, tmp_path: Path):
    if block.skip_reason is not None:
        pytest.skip(f"not-run: {block.skip_reason}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    env["MPLBACKEND"] = "Agg"
    try:
        result = subprocess.run(
            [sys.executable, "-c", block.code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{block.id}: still running after {TIMEOUT_S} s\n--- stderr ---\n{readable(stderr)}")
    assert result.returncode == 0, (
        f"{block.id}: exit code {result.returncode}\n--- stdout ---\n{readable(result.stdout, 2000)}"
        f"\n--- stderr ---\n{readable(result.stderr)}"
    )
