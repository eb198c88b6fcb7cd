"""Overhead of reading every site (resid_pre/post, attn_out, mlp_out of all layers) vs a plain forward.

Runs the base model (no lm_head) on SmolLM2 (or --model) and prints tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from auditui.engine.model import load_model
from auditui.engine.sites import SiteHooks, all_sites


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    lm = load_model(args.model, device="auto", dtype="auto")
    body = lm.model.get_submodule(lm.adapter.body)
    ids = torch.randint(100, lm.model.config.vocab_size, (args.batch, args.seq), device=lm.device)
    sites = all_sites(lm.n_layers, ("resid_pre", "resid_post", "attn_out", "mlp_out"))

    def plain() -> None:
        with torch.inference_mode():
            body(ids)

    def hooked() -> None:
        with torch.inference_mode(), SiteHooks(lm.model, reads=sites):
            body(ids)

    plain_s, hooked_s = timed(plain, args.repeats), timed(hooked, args.repeats)
    n_tok = args.batch * args.seq
    print(f"{lm.model_id}: {len(sites)} sites, batch {args.batch} x {args.seq} tokens, {lm.device}")
    print(f"plain forward: {n_tok / plain_s:,.0f} tok/s; reading all sites: {n_tok / hooked_s:,.0f} tok/s")
    print(f"overhead ratio hooked/plain: {hooked_s / plain_s:.2f}x")


if __name__ == "__main__":
    main()
