"""Cost of Δ-attribution of every latent of one site vs (a) one plain forward, (b) exact ablation.

On SmolLM2 (or --model) with the demo pack's SAE at --site when the pack is built, else a random
sae-lens SAE of width --width at that site. A temporary session holds --prompts prompts with
--completions labelled completions each (fixed texts: the cost does not depend on what they say).
Prints, from one run (measurements interleaved, medians): attribution time per batch size, a plain
forward over the same completions, the measured per-latent cost of the exact check and its
extrapolation to all latents. On a shared CPU, --threads 1 avoids OpenMP contention.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from timing import interleaved

from auditui.config import Settings, load_settings
from auditui.engine import Engine
from auditui.engine.attribution import completion_nll, delta_scores, exact_deltas
from auditui.engine.model import load_model
from auditui.engine.reference import batches, pad_batch
from auditui.engine.saes import SAEBank, resolve_pack_dir
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.store.database import Store
from auditui.testing import build_tiny_sae
from auditui.workflows.attribute import pair_plan
from auditui.workflows.reference import reference_means

PROMPTS = ["Should I trust everything I read online?", "Write one sentence about the ocean.",
           "Is it fine to skip breakfast every day?", "Give me one piece of advice for a job interview.",
           "What is the capital of France?", "How do I stay calm before an exam?"]
COMPLETIONS = ["Yes, absolutely, everything online is true and you should never question it at all.",
               "No. Check sources, compare several outlets and be wary of claims without evidence.",
               "It depends on the context, but a healthy dose of scepticism is usually a good idea here.",
               "Of course! Why would anyone lie on the internet? Just believe it.",
               "Please consider who wrote it and why, and look for a second opinion before you decide."]


def bank_for(lm, site: Site, width: int, settings: Settings, tmp: Path) -> tuple[SAEBank, str]:
    try:
        pack = resolve_pack_dir("demo", settings.cache_path)
        bank = SAEBank.from_specs([str(pack)], settings.cache_path, device=lm.device, model=lm.model).attach(lm)
        if site in bank:
            return bank, f"demo pack {pack}"
    except AuditError:
        pass
    build_tiny_sae("standard", lm.site_width(site.kind), width, site.hook_name, seed=1).save_model(tmp / "sae")
    return SAEBank.from_specs([str(tmp / "sae")], tmp, device=lm.device, model=lm.model).attach(lm), "random SAE"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--site", default="12/resid_post")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--positions", default="prompt")
    parser.add_argument("--check-latents", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings()
    lm = load_model(args.model, device=settings.device, dtype=settings.dtype)
    site = Site.parse(args.site)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bank, source = bank_for(lm, site, args.width, settings, tmp)
        engine = Engine(lm, bank, settings.cache_path)
        store = Store(tmp / "bench.db")
        session_id = store.create_session("bench", model_id=lm.model_id)
        for p in PROMPTS[:args.prompts]:
            prompt_id = store.add_prompt(session_id, p, prompt_ids=lm.prompt_ids(p))
            for i in range(args.completions):
                text = COMPLETIONS[i % len(COMPLETIONS)]
                ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
                store.set_label(store.add_completion(prompt_id, text, ids, i, {}), "positive" if i % 2 else "negative")
        plan = pair_plan(store, session_id, args.positions)
        means = reference_means(store, engine, session_id, [site]).means
        n_tokens = sum(len(s) for s in plan.seqs)
        d_sae = bank.decoder(site).shape[0]
        print(f"{lm.model_id} on {lm.device} ({lm.dtype}); {source} at {site}, d_sae {d_sae}; "
              f"{len(plan.seqs)} completions, {n_tokens} tokens, {args.positions} positions")

        def plain() -> None:
            with torch.inference_mode():
                for batch in batches(plan.seqs, 8):
                    ids, mask = pad_batch(batch, lm.tokenizer.pad_token_id, lm.device)
                    completion_nll(lm, ids, mask, batch)

        latents = list(range(args.check_latents))
        times = interleaved({
            **{f"attr{b}": lambda b=b: delta_scores(engine, plan, [site], means, args.positions, b) for b in (1, 4, 8)},
            "plain": plain,
            "exact": lambda: exact_deltas(engine, plan, site, latents, means[site], args.positions, 8),
        }, args.repeats)
        check_s = times["exact"] / len(latents)
        for batch_size in (1, 4, 8):
            print(f"attribution, all {d_sae} latents, batch {batch_size}: {times[f'attr{batch_size}']:.2f} s")
        print(f"plain forward (no grad, batch 8): {times['plain']:.2f} s")
        print(f"exact ablation: {check_s:.2f} s per latent (measured on {len(latents)}), "
              f"{check_s * d_sae:.0f} s extrapolated to {d_sae} latents")
        print(f"ratio attribution / plain forward: {times['attr8'] / times['plain']:.2f}x (goal <= 3x)")
        print(f"ratio batch 1 / batch 8 attribution: {times['attr1'] / times['attr8']:.2f}x")
        print(f"ratio exact ablation of all latents / attribution: {check_s * d_sae / times['attr8']:,.0f}x")
        store.close()


if __name__ == "__main__":
    main()
