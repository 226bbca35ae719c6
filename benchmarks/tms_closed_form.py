"""How far apd_lens' exact TMS attributions are from the best hand-written form for TMS alone.

    python benchmarks/tms_closed_form.py [--threads 2] [--repeats 30]

TMS 40-10 (batch 2048, C 40): apd_lens computes exact attributions ``sum_o (J_o . a_c)^2`` by forward
mode through the model's hooks (``attribution_backend="jvp"``). For ``out = ReLU(x W W^T + b)`` alone
they have a closed form: with ``z = [x A_c, (x W) B_c^T]`` ``[C, n, 2m]`` and ``R_c = [B_c W^T; A_c^T]``
``[C, 2m, 40]``, the output tangent of component c is ``relu'(pre) * (z_c @ R_c)``: one batched matmul, the
ReLU mask and one squared norm, with no hooks and no vmap. Both run side by side in this process; the
script checks that they agree and prints their median times. It bounds what a model-specific shortcut
could gain; apd_lens does not use it (it would bypass the hooks design for one model).
"""

from __future__ import annotations

import argparse

import torch
from step_benchmark import median_ms, positive_int  # this directory is on sys.path when run as a script

from apd_lens.methods.apd.attributions import jvp_attributions
from apd_lens.methods.apd.decomposition import Decomposition
from apd_lens.models.tms import TMS, TMSData
from apd_lens.training.loop import resolve_specs
from apd_lens.training.malloc_tuning import keep_freed_memory


def closed_form_attributions(x: torch.Tensor, model: TMS, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[n, C]`` exact attributions of TMS from its weights and the components' A ``[C, F, m]``, B ``[C, m, H]``."""
    w, bias = model.W.detach(), model.b_final.detach()
    n_components, n_features, rank = a.shape
    hidden = x @ w
    pre = hidden @ w.T + bias
    x_a = (x @ a.permute(1, 0, 2).reshape(n_features, -1)).view(-1, n_components, rank)
    h_bt = (hidden @ b.permute(2, 0, 1).reshape(w.shape[1], -1)).view(-1, n_components, rank)
    inner = torch.cat([x_a, h_bt], 2).transpose(0, 1)  # [C, n, 2m]
    read = torch.cat([b @ w.T, a.transpose(1, 2)], 1)  # [C, 2m, F]
    tangent = torch.bmm(inner, read).mul_(pre > 0)  # [C, n, F]
    return torch.linalg.vecdot(tangent, tangent).T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--repeats", type=positive_int, default=30)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    model = TMS(40, 10, seed=0)
    config = model.apd_default_config().replace(progress=False, n_components=40)
    x = TMSData(40, config.batch_size, seed=1).sample()
    dec = Decomposition(model, resolve_specs(model, None, config.weights), config)
    comp = dec.components["W"]
    record = dec.target_pass(x, make_leaves=False)

    def ours():
        return jvp_attributions(model, x, record, dec.plan, dec.components)

    def closed():
        return closed_form_attributions(x, model, comp.A.detach(), comp.B.detach())

    with torch.no_grad():
        reference = ours()
        error = float((closed() - reference).abs().max() / reference.abs().max())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; max relative difference {error:.1e}")
    if error > 1e-4:
        raise SystemExit("the closed form does not match apd_lens' attributions")
    for _ in range(2):
        ours_ms, closed_ms = median_ms(ours, args.repeats), median_ms(closed, args.repeats)
        print(f"apd_lens jvp {ours_ms:7.2f} ms   TMS closed form {closed_ms:7.2f} ms")


if __name__ == "__main__":
    main()
