"""Small helpers shared by tests (independent of the code under test)."""

from __future__ import annotations

import torch


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

