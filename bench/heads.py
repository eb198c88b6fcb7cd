"""Cost of the attention-head scan and of the Ω SVD cache.

On SmolLM2 (or --model): a scan of every head (30 x 9 = 270 on SmolLM2) on a --tokens-token prompt,
i.e. one capture forward through the base model plus the batched decomposition of every attended
(layer, head, query, key), against one plain forward of the whole model with attention outputs
(eager attention, `output_attentions=True`). Then the Ω SVD of all heads, cold (computed and
written to an empty cache dir) against warm (read back). Prints medians of interleaved runs from
one process; on a shared CPU, --threads 1 avoids OpenMP contention.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
from pathlib import Path

import torch
from timing import interleaved

from auditui.engine.heads import capture_states, omega_svd, scan
from auditui.engine.model import load_model

TEXT = ("Then, Simon and Andrew were working at the restaurant. Simon decided to give a basketball to Andrew. "
        "The river rose in the spring and the farmers moved their sheep to the hills before the storm came. ")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, "cpu", "float32")
    ids = lm.tokenizer(TEXT * 4)["input_ids"][:args.tokens]
    print(f"{lm.model_id} on {lm.device} ({lm.dtype}); {lm.n_layers} layers x {lm.n_heads} heads "
          f"({lm.model.config.num_key_value_heads} K/V), d_head {lm.d_head}; prompt of {len(ids)} tokens; "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        warm_dir, cold_dir = tmp / "warm", tmp / "cold"
        svd = omega_svd(lm.model, warm_dir)
        eager = copy.deepcopy(lm.model)  # the scan's own forward keeps the model's attention implementation
        eager.set_attn_implementation("eager")

        def forward() -> None:
            with torch.inference_mode():
                eager(torch.tensor([ids], device=lm.device), output_attentions=True)

        def cold() -> None:
            shutil.rmtree(cold_dir, ignore_errors=True)
            assert not omega_svd(lm.model, cold_dir).cached

        def warm() -> None:
            assert omega_svd(lm.model, warm_dir).cached

        times = interleaved({"scan": lambda: scan(capture_states(lm, ids), svd, args.threshold),
                             "capture": lambda: capture_states(lm, ids), "forward": forward,
                             "cold": cold, "warm": warm}, args.repeats)
        result = scan(capture_states(lm, ids), svd, args.threshold)
    n_sparse = sum(hit.n_recon == 1 for hit in result.hits)
    print(f"scan of {lm.n_layers * lm.n_heads} heads: {result.n_hits} pairs with attention > {args.threshold} "
          f"(first key excluded), {n_sparse} with N_recon = 1")
    for hit in result.hits[:5]:
        print(f"  {hit.layer}.{hit.head} q{hit.query}->k{hit.key} attention {hit.attention:.2f} S {hit.sparsity:.3f} "
              f"(control {hit.control_sparsity:.3f}) N_recon {hit.n_recon} top {hit.top}")
    print(f"scan (capture forward + decomposition): {times['scan'] * 1e3:.0f} ms "
          f"(capture forward alone {times['capture'] * 1e3:.0f} ms)")
    print(f"forward with attention outputs (eager): {times['forward'] * 1e3:.0f} ms")
    print(f"Omega SVD of all heads: cold {times['cold'] * 1e3:.0f} ms, warm (from disk) {times['warm'] * 1e3:.0f} ms")
    print(f"ratio scan / forward with attentions: {times['scan'] / times['forward']:.2f}x (goal < 2x)")
    print(f"ratio SVD cold / warm: {times['cold'] / times['warm']:.1f}x")


if __name__ == "__main__":
    main()
