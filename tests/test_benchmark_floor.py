"""The benchmark's floors: the recorded matmul calls of a step, their FLOP count, their replay."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.tms import TMS
from apd_lens.training.loop import resolve_specs


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_benchmark.py"
    spec = importlib.util.spec_from_file_location("step_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def calls_of(bench, total):
    """The matmul calls ``step_matmul_calls`` records for a step whose loss is ``total()``."""

    class Step:  # a Decomposition stand-in: step_matmul_calls only needs losses() and the parameters
        def trainable_parameters(self):
            return []

        def losses(self, _x):
            return {"total": total().requires_grad_()}

    return bench.step_matmul_calls(Step(), None)


def test_flop_count_of_each_matmul_kind(bench):
    """Hand-counted FLOPs (2 per multiply-add) of one call of each recorded kind."""
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    ba, bb = torch.randn(6, 3, 4), torch.randn(6, 4, 5)
    v = torch.randn(4)

    calls = calls_of(
        bench,
        lambda: (
            (a @ b).sum()  # mm 3x4x5
            + torch.addmm(torch.zeros(5), a, b).sum()  # addmm 3x4x5
            + torch.bmm(ba, bb).sum()  # bmm 6x3x4x5
            + torch.addbmm(torch.zeros(3, 5), ba, bb).sum()  # addbmm 6x3x4x5
            + torch.baddbmm(torch.zeros(6, 3, 5), ba, bb).sum()  # baddbmm 6x3x4x5
            + (a @ v).sum()  # mv 3x4
            + v.dot(v)  # dot 4
        ),
    )
    names = [bench.op_name(c) for c in calls]
    assert names == ["mm", "addmm", "bmm", "addbmm", "baddbmm", "mv", "dot"]
    assert [bench.matmul_flop(c) for c in calls] == [120, 120, 720, 720, 720, 24, 8]


def test_step_calls_agree_with_torch_flop_counter(bench):
    """On a real step (forward and backward), the recorded calls that torch's counter also knows
    (mm, addmm, bmm, baddbmm) add up to its count; addbmm (faithfulness) it does not count."""
    model = TMS(5, 2)
    config = model.apd_default_config().replace(progress=False, batch_size=64)
    dec = Decomposition(model, resolve_specs(model, None, config.weights), config)
    x = torch.rand(64, 5)
    calls = bench.step_matmul_calls(dec, x)
    known = sum(bench.matmul_flop(c) for c in calls if bench.op_name(c) in ("mm", "addmm", "bmm", "baddbmm"))
    for p in dec.component_parameters():
        p.grad = None
    with FlopCounterMode(display=False) as counter:
        dec.losses(x)["total"].backward()
    assert known == counter.get_total_flops()
    assert any(bench.op_name(c) == "addbmm" for c in calls)


def test_replay_runs_recorded_layouts(bench):
    """Replayed operands keep the recorded strides (a broadcast stride-0 operand included) and the
    replay time is positive and scales with the call count."""
    x = torch.randn(7, 8).expand(3, 7, 8)  # stride (0, 8, 1), as the faithfulness backward's residual
    y = torch.randn(3, 8, 2)

    calls = calls_of(bench, lambda: torch.bmm(x, y).sum())
    assert calls[0][1][0] == ("tensor", (3, 7, 8), (0, 8, 1), torch.float32)
    once = bench.replayed_matmul_ms(calls)
    assert once > 0
    assert bench.replayed_matmul_ms(calls * 50) > once
