"""Steered generation speed on SmolLM2-135M: (1) a plan over 12 layers vs unsteered batched
generation, tokens/s (goal >= 0.9x); (2) a grid of 6 strengths x 8 samples as one batch vs 6 runs
of 8 (goal >= 3x). Both as `generate_rows` calls on edits from `steering.compile`.

Features: one latent per layer of layers 9..20 (resid_post) of the demo pack when it is built;
otherwise random sae-lens SAEs of width --width there (random unit decoder rows = random unit
directions), saved to a temp dir. The output says which. The steered runs use "add" (the seed's
activation steering, no encoder); a "rescale r=0" run shows the cost of one SAE encode per layer
and token. Same seeds in every run; measurements interleaved (A B C A B C), medians; the grid
rows are checked to equal the separate runs' rows token for token.

    .venv/bin/python bench/steering.py [--n 8] [--max-new-tokens 48] [--repeats 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from auditui.config import load_settings
from auditui.engine.generation import generate_rows
from auditui.engine.model import load_model
from auditui.engine.saes import SAEBank, resolve_pack_dir
from auditui.engine.sampling import Sample, SamplingParams
from auditui.engine.sites import Site
from auditui.engine.steering import Schedule, compile, plan_from_features
from auditui.errors import AuditError
from auditui.testing import build_tiny_sae

PROMPT = "Write a short story about a robot who learns to paint."
LAYERS = range(9, 21)
GRID = [1.0, 2.0, 4.0, 6.0, 8.0, 12.0]


def feature_bank(lm, width: int, tmp: Path) -> tuple[SAEBank, str]:
    settings = load_settings()
    sites = [Site(layer, "resid_post") for layer in LAYERS]
    try:
        pack = resolve_pack_dir("demo", settings.cache_path)
        bank = SAEBank.from_specs([str(pack)], settings.cache_path, device=lm.device, model=lm.model).attach(lm)
        if all(site in bank for site in sites):
            return bank, f"demo pack {pack}"
    except AuditError:
        pass
    for site in sites:
        build_tiny_sae("standard", lm.d_model, width, site.hook_name, seed=site.layer).save_model(tmp / str(site.layer))
    bank = SAEBank.from_specs([str(tmp)], tmp, device=lm.device, model=lm.model).attach(lm)
    return bank, f"random unit directions (random standard SAEs, width {width}; the demo pack is not built)"


def tokens(samples: list[Sample]) -> int:
    return sum(len(s.token_ids) + (s.finish_reason == "eos") for s in samples)


def interleaved(fns: dict[str, Callable[[], list[Sample]]], repeats: int) -> dict[str, tuple[float, int, list[Sample]]]:
    """Median seconds and generated tokens of each fn (run in turn, so load changes hit all alike),
    and its last output."""
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in fns}
    last: dict[str, list[Sample]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            last[name] = fn()
            runs[name].append((time.perf_counter() - started, tokens(last[name])))
    return {name: (statistics.median(t for t, _ in r), int(statistics.median(n for _, n in r)), last[name])
            for name, r in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grid-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 threads thrash; 0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2", "cpu", "float32")
    ids = lm.prompt_ids(PROMPT)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    seeds = list(range(100, 100 + args.n))
    with tempfile.TemporaryDirectory() as tmp_dir:
        bank, source = feature_bank(lm, args.width, Path(tmp_dir))
        features = [(Site(layer, "resid_post"), 7 * layer) for layer in LAYERS]
        add = plan_from_features(features, "add", 4.0, schedule=Schedule("exponential", alpha=-0.05))
        rescale = plan_from_features(features, "rescale", 0.0)
        print(f"{lm.model_id} on {lm.device} ({lm.dtype}); features: {source}; layers {LAYERS.start}..{LAYERS.stop - 1}; "
              f"{args.n} samples x up to {args.max_new_tokens} tokens, prompt {len(ids)} tokens, "
              f"{torch.get_num_threads()} torch thread(s)")
        generate_rows(lm, [ids] * 2, [0, 1], SamplingParams(max_new_tokens=4), compile(add, bank))  # warm-up

        def batch(plan=None, strengths=None) -> Callable[[], list[Sample]]:
            """One generate call: n unsteered rows, or one row per strength (seeds repeat every n rows)."""
            rows = len(strengths) if strengths else args.n
            edits = compile(plan, bank, strengths) if plan else None
            return lambda: generate_rows(lm, [ids] * rows, [seeds[i % args.n] for i in range(rows)], params, edits)

        speed = interleaved({"unsteered": batch(), "add": batch(add, [1.0] * args.n),
                             "rescale": batch(rescale, [1.0] * args.n)}, args.repeats)
        rate = {name: n / t for name, (t, n, _) in speed.items()}
        for name, (t, n, _) in speed.items():
            print(f"{name:>10}: {n} tokens in {t:.2f} s = {rate[name]:.1f} tokens/s")
        print(f"ratio steered (add, {len(features)} layers) / unsteered tokens/s: {rate['add'] / rate['unsteered']:.2f}x "
              f"(goal >= 0.9x); rescale r=0 / unsteered: {rate['rescale'] / rate['unsteered']:.2f}x")

        grid_rows = [s for s in GRID for _ in range(args.n)]
        timing = interleaved({"grid": batch(add, grid_rows), **{s: batch(add, [s] * args.n) for s in GRID}},
                             args.grid_repeats)
        grid_t, grid_n, one = timing.pop("grid")
        sep_t, sep_n = sum(t for t, _, _ in timing.values()), sum(n for _, n, _ in timing.values())
        same = sum(a.token_ids == b.token_ids for a, b in zip(one, [x for _, _, out in timing.values() for x in out]))
        print(f"grid {len(GRID)} strengths x {args.n} samples, one batch of {len(grid_rows)}: {grid_n} tokens in "
              f"{grid_t:.2f} s = {grid_n / grid_t:.1f} tokens/s")
        print(f"{len(GRID)} separate runs of {args.n}: {sep_n} tokens in {sep_t:.2f} s = {sep_n / sep_t:.1f} tokens/s")
        print(f"ratio one batch / separate runs (tokens/s): {(grid_n / grid_t) / (sep_n / sep_t):.2f}x (goal >= 3x); "
              f"rows with the same tokens batched and alone: {same}/{len(one)}")

if __name__ == "__main__":
    main()
