"""apd_lens under jaxtyping + beartype, as a type-checked research script uses it.

Design: tests/typecheck_run.py runs in a fresh interpreter (the import hook must be installed before
apd_lens is first imported): it imports apd_lens through ``install_import_hook("apd_lens",
"beartype.beartype")``, so every hint of every apd_lens function is checked on every call, runs tiny
APD and SPD decompositions of TMS 5-2 and of a one-layer HookedTransformer (APD's attributions through
``torch.func.vmap``), and makes three calls with a wrong shape. Here: the outputs match computations
by hand (an untrue annotation would have raised before), and each wrong shape raised jaxtyping's
error naming the dimension. The same calls without the hook raise the library's own errors (tests/test_bad_input.py,
tests/test_spd_training.py). ``APD_LENS_TYPECHECK=1`` (tests/conftest.py) runs other tests so too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180


@pytest.fixture(scope="module")
def report() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "typecheck_run.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_decompositions_run_checked_and_match_computations_by_hand(report):
    assert report["hooked"], "apd_lens was not imported through the import hook"
    assert report["apd_error"] < 1e-5  # components 0 and 2 only, vs relu(x P P^T + b) with P = P_0 + P_2
    assert report["spd_error"] < 1e-5  # every subcomponent on plus the delta component: the target
    assert report["spd_ci_shapes"] == {"W": [8, 40], "W:use1": [8, 40]}
    assert report["transformer_error"] < 1e-4  # likewise, on a HookedTransformer's logits
    assert report["transformer_ci_shapes"] == {
        "blocks.0.mlp.W_in": [2, 6, 4],
        "blocks.0.mlp.W_out": [2, 6, 4],
    }
    assert report["transformer_apd_mask_shape"] == [2, 6, 4]  # APD's attributions through torch.func.vmap


@pytest.mark.parametrize(
    "call,needles",
    [
        # Decomposition.forward(x, mask): mask [*batch, C] with C = 6, not n_components = 5
        ("mask_of_wrong_C", ["Decomposition.forward", "parameter 'mask'", "f32[8,6]", "C={self.n_components}"]),
        # TMS.forward(x): x [*batch, n_features] with 6 features, not 5
        ("data_of_wrong_width", ["TMS.forward", "parameter 'x'", "f32[8,6]", "n_features={self.n_features}"]),
        # SPDDecomposition(x, masks): x has a batch of 8, the CI of site W:use1 a batch of 4
        ("site_ci_of_another_batch", ["'site': 'W:use1'", "parameter 'mask'", "f32[4,40]", "batch=torch.Size([8])"]),
    ],
)
def test_a_wrong_shape_raises_the_jaxtyping_error_naming_the_dimension(report, call, needles):
    raised = report["wrong_shape"][call]
    assert raised["type"] == "jaxtyping.TypeCheckError", raised
    for needle in needles:
        assert needle in raised["message"], (needle, raised["message"])
