"""Run by tests/test_distributed.py: a small TMS decomposition (APD or SPD) or a tiny language model's (the VPD
recipe), single process or under torchrun."""

import sys

import torch

import apd_lens
from apd_lens import APDConfig
from apd_lens.models.tms import TMS
from apd_lens.training import distributed


def main(out_path: str, method: str) -> None:
    torch.manual_seed(0)
    model = TMS(8, 3, seed=0).double()
    data = torch.rand(512, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = data * (torch.rand(512, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) < 0.3)
    config = APDConfig(
        n_components=6,
        topk=1.5,
        steps=30,
        batch_size=64,
        lr=1e-2,
        progress=False,
        log_every=10,
        simplicity_coeff=0.5,
        schatten_p=0.9,
    )
    if method == "spd":
        config = apd_lens.SPDConfig(  # with the adversarial term and subset routing, each drawn per global batch
            n_subcomponents=6,
            steps=30,
            batch_size=64,
            lr=1e-2,
            progress=False,
            log_every=10,
            n_mask_samples=2,
            stochastic_recon_subset_coeff=0.5,
            pgd_recon_coeff=0.5,
            pgd_steps=2,
            pgd_step_size=0.2,
            pgd_scope="shared",
            pgd_subset_routing=True,
        )
    if method == "vpd":  # the LM recipe on a tiny HookedTransformer: persistent PGD, global CI, clip, subsets
        model, data, config = tiny_language_model_run()
    dec = apd_lens.decompose(model, data, config)
    if distributed.is_main_process():
        torch.save(
            {k: v.detach().cpu() for k, v in dec.state_dict().items() if not k.startswith("model.")}
            | {"history": dec.loss_history, "world": distributed.world_size()},
            out_path,
        )


def tiny_language_model_run():
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from apd_lens.methods.spd.presets import vpd_config

    cfg = dict(n_layers=1, d_model=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=20, n_ctx=6, act_fn="gelu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = HookedTransformer(HookedTransformerConfig(**cfg, normalization_type="LNPre", dtype=torch.float64))
    tokens = torch.randint(0, 20, (64, 6), generator=torch.Generator().manual_seed(3))
    config = vpd_config(model, steps=20, batch_size=8, faithfulness_warmup_steps=5, progress=False, log_every=10)
    return model, tokens, config


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
