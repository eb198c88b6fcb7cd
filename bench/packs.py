"""Pack build throughput: sae-lens's dense TopK training step vs auditui's sparse one, and the
model forward with every pack site hooked — all measured in one run, printed as ratios.

    .venv/bin/python bench/packs.py [--model smollm2] [--width 2048] [--k 32] [--batch 4096]

The build time of a pack is about  tokens * (1 / forward_rate + n_saes / trainer_rate).
"""

from __future__ import annotations

import argparse
import time

import torch

from auditui.engine.model import load_model
from auditui.engine.packs import pack_sites, valid_tokens
from auditui.engine.sae_training import TopKTrainer, TrainConfig, norm_scale
from auditui.engine.sites import Site, SiteHooks


def rate(fn, tokens: int, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return tokens * repeats / (time.perf_counter() - started)


def sae_lens_step(x: torch.Tensor, width: int, k: int):
    """One sae-lens TopK training step (forward, AuxK, dense backward, Adam)."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=width, k=k, device=str(x.device)))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(width, dtype=torch.bool, device=x.device)
    dead[: width // 10] = True  # AuxK active in both trainers

    def step() -> None:
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=0, is_logging_step=False))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    lm = load_model(args.model, device="auto", dtype="auto")
    sites = pack_sites(tuple(range(lm.n_layers)))
    body = lm.model.get_submodule(lm.adapter.body)
    ids = torch.randint(100, lm.model.config.vocab_size, (8, 256), device=lm.device)

    def forward() -> dict:
        with torch.inference_mode(), SiteHooks(lm.model, reads=sites) as hooks:
            body(ids)
        return hooks.acts
    acts = forward()
    site = Site(lm.n_layers // 2, "resid_post")
    real = acts[site][valid_tokens(acts, 50.0)].float()
    x = real[torch.randint(0, len(real), (args.batch,), device=real.device)]
    forward_rate = rate(forward, ids.numel(), args.repeats)
    dense_rate = rate(sae_lens_step(x / norm_scale(x), args.width, args.k), args.batch, args.repeats)
    trainer = TopKTrainer(x.shape[1], TrainConfig(d_sae=args.width, k=args.k, dead_tokens=0), lm.device,
                          norm_scale(x), x.mean(0))
    trainer.since_fired[args.width // 10:] = -10**9  # the same 10% dead as above
    sparse_rate = rate(lambda: trainer.step(x), args.batch, args.repeats)
    n_saes = len(sites)
    combined = 1 / (1 / forward_rate + n_saes / sparse_rate)
    print(f"{lm.model_id} on {lm.device}, {torch.get_num_threads()} threads; width {args.width}, k {args.k}, "
          f"batch {args.batch}")
    print(f"forward with {n_saes} sites hooked: {forward_rate:,.0f} tok/s")
    print(f"TopK training step, sae-lens dense: {dense_rate:,.0f} tok/s; auditui sparse: {sparse_rate:,.0f} tok/s; "
          f"ratio sparse/dense {sparse_rate / dense_rate:.2f}x")
    print(f"pack of {n_saes} SAEs fed by one forward: {combined:,.0f} tok/s -> "
          f"{combined * 60:,.0f} tokens per SAE per minute")


if __name__ == "__main__":
    main()
