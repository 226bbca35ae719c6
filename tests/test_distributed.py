"""Two gloo processes under torchrun give the decomposition of one process at the same global batch
(APD: the batch top-k over the global batch; SPD: the mask sources, the subset routes and the PGD
sources, routed through subsets, drawn for the global batch)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("distributed_run.py")
ROOT = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, nproc: int, method: str) -> dict:
    out = tmp_path / f"result_{nproc}.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), str(out), method]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(SCRIPT),
            str(out),
            method,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("method", ["apd", "spd", "vpd"])
def test_two_gloo_processes_match_one(tmp_path, method):
    single = run(tmp_path, 1, method)
    double = run(tmp_path, 2, method)
    assert single["world"] == 1 and double["world"] == 2
    keys = [k for k in single if k not in ("history", "world")]
    assert keys
    for k in keys:
        torch.testing.assert_close(double[k], single[k], rtol=1e-6, atol=1e-9)
    # the logged losses are the global-batch values (averaged over ranks)
    for a, b in zip(single["history"], double["history"], strict=True):
        for term in a:
            assert abs(a[term] - b[term]) <= 1e-6 * max(abs(a[term]), 1e-12), (term, a, b)
    # and the run actually trained: components moved away from their initialization
    assert single["history"][-1]["total"] < single["history"][0]["total"]
