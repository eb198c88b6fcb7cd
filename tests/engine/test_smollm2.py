"""Slow tier: the same site identities and CLI commands on the real SmolLM2-135M-Instruct."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from auditui.cli import app
from auditui.engine.sites import KINDS, Site, SiteHooks, all_sites
from auditui.testing import build_tiny_pack

pytestmark = pytest.mark.slow


def test_smollm2_sites(smollm2):
    lm = smollm2
    assert lm.adapter.name == "llama" and lm.n_layers == 30 and lm.d_model == 576 and lm.has_chat_template
    ids = torch.tensor([lm.prompt_ids("Name three colours.")])
    with torch.inference_mode(), SiteHooks(lm.model, reads=all_sites(lm.n_layers, KINDS)) as hooks:
        out = lm.model(ids, output_hidden_states=True)
    acts = hooks.acts
    for layer in range(lm.n_layers - 1):
        torch.testing.assert_close(acts[Site(layer, "resid_post")], out.hidden_states[layer + 1])
        torch.testing.assert_close(acts[Site(layer + 1, "resid_pre")], acts[Site(layer, "resid_post")])
    for layer in range(lm.n_layers):
        parts = acts[Site(layer, "resid_pre")] + acts[Site(layer, "attn_out")] + acts[Site(layer, "mlp_out")]
        torch.testing.assert_close(acts[Site(layer, "resid_post")], parts, atol=1e-3, rtol=1e-4)
    v = torch.randn(lm.d_model)
    with torch.inference_mode(), SiteHooks(lm.model, edits={Site(0, "resid_pre"): lambda h, s: h + v}):
        hooked = lm.model(ids).logits
    with torch.inference_mode():
        by_hand = lm.model(inputs_embeds=lm.model.get_input_embeddings()(ids) + v).logits
    torch.testing.assert_close(hooked, by_hand, atol=1e-3, rtol=1e-3)


def test_smollm2_chat_template_prompt(smollm2):
    text = smollm2.tokenizer.decode(smollm2.prompt_ids("Hi"))
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_smollm2_doctor_and_inspect(smollm2, smollm2_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDITUI_CACHE_DIR", str(smollm2_cache))
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--model", "smollm2", "--pack", "", "--json"])
    checks = {row["check"]: row for row in json.loads(result.stdout)}
    assert checks["model"]["ok"] and "cache ready" in checks["model"]["detail"]
    model_dir = smollm2.source
    pack = build_tiny_pack(model_dir, tmp_path / "pack", d_sae=64, sites=[Site(3, "resid_post"), Site(3, "mlp_out")])
    result = runner.invoke(app, ["inspect", "--model", "smollm2", "--pack", str(pack), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["model"]["n_layers"] == 30 and data["coverage"][3]["resid_post"] == "standard/64"
    assert data["coverage"][3]["mlp_out"] == "topk/64" and data["coverage"][4]["resid_post"] is None
