"""The language-model target on a tiny corpus folder: split by file, fingerprint, save / load,
refusals, held-out CE."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformer_lens.HookedTransformer")
pytest.importorskip("tokenizers")

from apd_lens.models.lm import (  # noqa: E402
    CorpusMismatchError,
    LMTargetConfig,
    load_corpus,
    load_or_train_lm_target,
)
from apd_lens.models.lm.tokenizer import END_OF_FILE  # noqa: E402
from apd_lens.models.lm.training import held_out_ce  # noqa: E402

TINY = LMTargetConfig(
    n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=16, vocab_size=300, steps=20, batch_size=8, lr=1e-2
)

KEPT = [f"pkg{i}/mod_{j}.py" for i in range(3) for j in range(8)] + ["top.py"]
SKIPPED = ["test/test_a.py", "pkg0/tests/test_b.py", "idlelib/idle_test/x.py", "site-packages/lib.py", "notes.txt"]


def source(i: int) -> str:
    return (
        f"def function_{i}(value, scale={i}):\n"
        f'    """Multiply value by {i}."""\n'
        f"    result = value * scale + {i * 7}\n"
        "    for item in range(result):\n"
        "        if item % 3 == 0:\n"
        "            yield item\n"
        f"\n\nclass Thing{i}:\n    name = 'thing {i}'\n"
    )


def make_corpus(root: Path) -> Path:
    for i, rel in enumerate(KEPT + SKIPPED):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source(i))
    return root


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_root):
    folder = tmp_path_factory.mktemp("target") / "lm"
    torch.manual_seed(0)
    return folder, load_or_train_lm_target(folder, corpus_root, TINY, progress=False)


def test_corpus_keeps_only_code_outside_test_folders_and_splits_by_file(corpus_root):
    corpus = load_corpus(corpus_root)
    assert not set(corpus.train) & set(corpus.held_out)
    assert sorted([*corpus.train, *corpus.held_out]) == sorted(KEPT)
    # the rule, computed independently: the max(1, round(5%)) paths lowest by sha256 of the path
    by_hash = sorted(KEPT, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
    assert set(corpus.held_out) == {by_hash[0]}
    info = corpus.info
    assert (info.n_files_train, info.n_files_held_out) == (len(KEPT) - 1, 1)
    assert info.python_version is None and info.source == str(corpus_root)
    assert info.n_chars == sum(len(source(KEPT.index(p))) for p in KEPT)


def test_fingerprint_is_sha256_over_sorted_paths_and_contents(corpus_root):
    digest = hashlib.sha256()
    for rel in sorted(KEPT):
        digest.update(rel.encode() + b"\0" + (corpus_root / rel).read_bytes() + b"\0")
    assert load_corpus(corpus_root).info.sha256 == digest.hexdigest()


def test_stdlib_is_the_default_corpus_with_the_python_version():
    import sys

    # only the file list is read here (reading and tokenizing the whole stdlib is for the CLI)
    from apd_lens.models.lm.corpus import corpus_files, stdlib_root

    files = corpus_files(stdlib_root())
    parts = {part for f in files for part in f.relative_to(stdlib_root()).parts[:-1]}
    assert len(files) > 100 and not parts & {"test", "tests", "idle_test", "site-packages"}
    assert stdlib_root() == Path(sys.modules["os"].__file__).parent


def test_folder_without_python_files_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("no code here")
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "test_x.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=f"corpus folder '{tmp_path}' holds no .py files"):
        load_or_train_lm_target(tmp_path / "lm", tmp_path, TINY, progress=False)
    assert not (tmp_path / "lm").exists()


def test_trained_target_is_saved_with_its_record(trained, corpus_root):
    folder, target = trained
    record = json.loads((folder / "cfg.json").read_text())
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert target.trained_now and record == target.record
    assert record["tokens_seen"] == 20 * 8 * 16
    assert record["n_params"] == sum(p.numel() for p in target.model.parameters())
    assert record["model"]["d_vocab"] == target.tokenizer.get_vocab_size() == target.model.cfg.d_vocab <= 300
    assert target.model.cfg.normalization_type == "LNPre"
    corpus = record["corpus"]
    assert corpus["sha256"] == load_corpus(corpus_root).info.sha256
    # the train stream: every train file (sorted by path) encoded on its own, then an end-of-file token
    eof = target.tokenizer.token_to_id(END_OF_FILE)
    stream = []
    for rel in sorted(load_corpus(corpus_root).train):
        stream += target.tokenizer.encode((corpus_root / rel).read_text()).ids + [eof]
    assert corpus["n_tokens_train"] == len(stream) and target.train_tokens.shape == (len(stream) // 16, 16)
    assert target.train_tokens.dtype == torch.int64
    assert target.train_tokens.flatten().tolist() == stream[: len(stream) // 16 * 16]


def test_held_out_ce_matches_an_explicit_loop(trained):
    _, target = trained
    windows = target.held_out_tokens
    assert windows.shape[0] >= 2
    with torch.no_grad():
        per_window = [
            F.cross_entropy(target.model(w[None])[0, :-1], w[1:]).item() for w in windows
        ]  # every window predicts n_ctx - 1 tokens: the mean of the means is the mean over tokens
    expected = sum(per_window) / len(per_window)
    assert target.held_out_ce == pytest.approx(expected, rel=1e-5)
    assert held_out_ce(target.model, windows, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert target.held_out_ce < torch.log(torch.tensor(float(target.model.cfg.d_vocab))).item()  # it learned


def test_reloading_gives_identical_logits(trained, corpus_root):
    folder, target = trained
    again = load_or_train_lm_target(folder, corpus_root, progress=False)
    assert not again.trained_now
    x = target.held_out_tokens[:2]
    assert torch.equal(again.model(x), target.model(x))
    assert torch.equal(again.train_tokens, target.train_tokens)
    assert torch.equal(again.held_out_tokens, target.held_out_tokens)
    assert not any(p.requires_grad for p in again.model.parameters())


def test_reloading_without_the_saved_tokens_tokenizes_again(trained, corpus_root, tmp_path):
    folder, target = trained
    copy = shutil.copytree(folder, tmp_path / "copy")
    (copy / "tokens.safetensors").unlink()
    again = load_or_train_lm_target(copy, corpus_root, progress=False)
    assert torch.equal(again.train_tokens, target.train_tokens)
    assert torch.equal(again.held_out_tokens, target.held_out_tokens)


def test_other_settings_for_a_saved_target_are_refused(trained, corpus_root):
    folder, _ = trained
    other = LMTargetConfig(**{**TINY.__dict__, "steps": 21})
    with pytest.raises(ValueError, match="steps: saved 20, given 21"):
        load_or_train_lm_target(folder, corpus_root, other, progress=False)


def test_a_changed_corpus_is_refused_and_the_folder_untouched(trained, corpus_root, tmp_path):
    folder, _ = trained
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    changed = shutil.copytree(corpus_root, tmp_path / "changed")
    (changed / "pkg1" / "mod_2.py").write_text(source(2) + "\n# edited\n")
    with pytest.raises(CorpusMismatchError) as err:
        load_or_train_lm_target(folder, changed, progress=False)
    assert "sha256: saved" in str(err.value) and "n_files" not in str(err.value)
    (changed / "extra.py").write_text(source(99))
    with pytest.raises(CorpusMismatchError, match=f"n_files: saved {len(KEPT)}, now {len(KEPT) + 1}"):
        load_or_train_lm_target(folder, changed, progress=False)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize(
    "change,needle", [({"n_heads": 3}, "d_model=16 is not a multiple of n_heads=3"), ({"steps": 0}, "'steps': 0")]
)
def test_bad_settings_are_refused(change, needle):
    with pytest.raises(ValueError, match=needle):
        LMTargetConfig(**{**TINY.__dict__, **change})
