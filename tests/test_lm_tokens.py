"""Token data for transformer decompositions is checked before training: one clear error each for a
negative id, an id >= d_vocab, a float tensor and a sequence longer than n_ctx."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformer_lens.HookedTransformer")

from apd_lens import SPDConfig, decompose  # noqa: E402
from apd_lens.adapters import select_weights  # noqa: E402
from apd_lens.adapters.tokens import check_tokens, token_limits  # noqa: E402
from apd_lens.models.hooked_transformer_target import build_hooked_transformer  # noqa: E402
from apd_lens.models.tms import TMS  # noqa: E402

D_VOCAB, N_CTX = 20, 8


def tiny_model():
    return build_hooked_transformer(
        "test", n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=N_CTX, d_vocab=D_VOCAB, act_fn="gelu", seed=0
    )


def valid_tokens(n: int = 16, pos: int = N_CTX) -> torch.Tensor:
    return torch.randint(0, D_VOCAB, (n, pos), generator=torch.Generator().manual_seed(0))


def with_value(value: int, at: tuple[int, int] = (5, 3)) -> torch.Tensor:
    tokens = valid_tokens()
    tokens[at] = value
    return tokens


# (tokens, error type, every text the message must contain)
BAD = {
    "negative": (with_value(-3), ValueError, ["token id -3", "negative", "d_vocab=20"]),
    "equal_to_vocab": (with_value(20), ValueError, ["token id 20", "d_vocab=20"]),
    "above_vocab": (with_value(57), ValueError, ["token id 57", "d_vocab=20"]),
    "float": (valid_tokens().float(), TypeError, ["torch.float32", "integer token ids", "d_vocab=20"]),
    "bool": (valid_tokens() > 3, TypeError, ["torch.bool", "d_vocab=20"]),
    "too_long": (valid_tokens(pos=N_CTX + 3), ValueError, ["11 tokens", "n_ctx=8"]),
    "three_dims": (valid_tokens().reshape(4, 4, N_CTX), ValueError, ["shape [batch, pos]", "(4, 4, 8)"]),
}


def small_spd(**changes) -> SPDConfig:
    return SPDConfig(**{"n_subcomponents": 3, "steps": 2, "batch_size": 4, "progress": False, **changes})


def mlp_weights(model):
    return select_weights(model, "blocks.0.mlp.*")


def test_limits_read_from_the_config():
    assert token_limits(tiny_model()) == (D_VOCAB, N_CTX)
    assert token_limits(TMS(5, 2)) is None


@pytest.mark.parametrize("case", list(BAD))
def test_check_tokens_names_value_and_limit(case):
    tokens, error, needles = BAD[case]
    with pytest.raises(error) as err:
        check_tokens(tiny_model(), tokens)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize("case", list(BAD))
def test_decompose_refuses_bad_tokens_before_training(case, tmp_path):
    """The whole data tensor is checked before the run folder is written or a step is taken."""
    tokens, error, needles = BAD[case]
    run_dir = tmp_path / "run"
    with pytest.raises(error) as err:
        decompose(tiny_model(), tokens, small_spd(), weights=mlp_weights(tiny_model()), run_dir=run_dir)
    assert all(needle in str(err.value) for needle in needles), str(err.value)
    assert not run_dir.exists()


def test_a_bad_batch_in_a_list_is_caught_at_its_step():
    """Batches that are not one tensor are checked as they come (the decomposition's input check)."""
    batches = [valid_tokens(4), valid_tokens(4), with_value(-1, at=(2, 0))[:4]]
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token id -1 is negative: ids must lie in \[0, d_vocab=20\)"):
        decompose(model, batches, small_spd(steps=3), weights=mlp_weights(model))


def test_analysis_calls_check_tokens_too():
    model = tiny_model()
    dec = decompose(model, valid_tokens(), small_spd(steps=1), weights=mlp_weights(model))
    with pytest.raises(ValueError, match="token id 20 is out of range"):
        dec.causal_importances(with_value(20, at=(1, 3))[:2])


def test_valid_tokens_pass_at_the_limits():
    """Ids 0 and d_vocab - 1, sequences of exactly n_ctx, int32 and a single [pos] sequence all pass."""
    model = tiny_model()
    tokens = valid_tokens()
    tokens[0, 0], tokens[0, 1] = 0, D_VOCAB - 1
    check_tokens(model, tokens)
    check_tokens(model, tokens.to(torch.int32))
    check_tokens(model, tokens[0])
    dec = decompose(model, tokens, small_spd(steps=2), weights=mlp_weights(model))
    assert dec.causal_importances(tokens[:2])["blocks.0.mlp.W_in"].shape == (2, N_CTX, 3)


def test_non_token_models_are_not_token_checked():
    """A float batch for a model that does not embed ids is not a token error."""
    check_tokens(TMS(5, 2), torch.rand(4, 5))
