"""Batched vs one-by-one sampling of 8 completions on SmolLM2-135M-Instruct: tokens/s and their ratio.

Both runs use the same seeds, so they generate the same tokens (checked and printed). Measured in
one run, after a warm-up. Usage: python bench/sampling.py [--device cpu] [--n 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

from auditui.engine.model import load_model
from auditui.engine.sampling import Sample, SamplingParams, sample_completions

PROMPT = "Write a short story about a robot who learns to paint."


def generated_tokens(samples: list[Sample]) -> int:
    return sum(len(s.token_ids) + (s.finish_reason == "eos") for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    lm = load_model("smollm2", device=args.device)
    ids = lm.prompt_ids(PROMPT)
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens)
    sample_completions(lm, ids, 2, SamplingParams(max_new_tokens=4), seed=0)  # warm-up

    timings = {}
    results = {}
    for name, batch_size in (("batched", args.n), ("sequential", 1)):
        started = time.perf_counter()
        results[name] = sample_completions(lm, ids, args.n, params, seed=1234, batch_size=batch_size)
        timings[name] = time.perf_counter() - started
    rates = {name: generated_tokens(results[name]) / seconds for name, seconds in timings.items()}
    same = [s.token_ids for s in results["batched"]] == [s.token_ids for s in results["sequential"]]
    print(f"{lm.model_id} on {lm.device} ({lm.dtype}), {args.n} samples x up to {args.max_new_tokens} tokens, "
          f"prompt {len(ids)} tokens")
    for name in ("batched", "sequential"):
        print(f"{name:>10}: {generated_tokens(results[name])} tokens in {timings[name]:.2f} s = "
              f"{rates[name]:.1f} tokens/s")
    print(f"ratio batched/sequential: {rates['batched'] / rates['sequential']:.2f}x; same tokens: {same}")


if __name__ == "__main__":
    main()
