"""Shared fixtures, and the switch that runs the tests with apd_lens's annotations checked.

``APD_LENS_TYPECHECK=1 pytest tests/...`` imports apd_lens through jaxtyping's import hook with
beartype (``install_import_hook("apd_lens", "beartype.beartype")``), as a type-checked research
script would: every function's argument and return hints, jaxtyping shapes included, are checked
on every call, so an untrue annotation fails the tests. ``make test`` runs a representative part so
(Makefile: TYPECHECKED_TESTS); not the tests of the library's own bad-input errors, which jaxtyping's
error for the same wrong shape precedes under the hook.
"""

import os
import sys

import pytest
import torch

if os.environ.get("APD_LENS_TYPECHECK") == "1":
    if "apd_lens" in sys.modules:
        raise RuntimeError("APD_LENS_TYPECHECK=1: apd_lens was imported before the hook could be installed")
    from jaxtyping import install_import_hook

    install_import_hook("apd_lens", "beartype.beartype")


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype, restoring the previous default after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
