"""SAE bank: round trips through sae-lens, width checks, pack manifests, hook_z projection."""

from __future__ import annotations

import json

import pytest
import torch

from auditui.engine.saes import SAEBank, read_pack, weights_digest
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.testing import ARCHITECTURES, build_tiny_sae


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_identical_encode_decode(architecture, tmp_path, loaded):
    lm = loaded("llama")
    sae = build_tiny_sae(architecture, lm.d_model, 96, "blocks.1.hook_resid_post", seed=3)
    sae.save_model(tmp_path / "sae")
    bank = SAEBank.from_specs([str(tmp_path / "sae")], tmp_path, model=lm.model).attach(lm)
    assert bank.sites == [Site(1, "resid_post")]
    loaded_sae = bank.sae(Site(1, "resid_post"))
    assert type(loaded_sae) is type(sae)
    x = 2.0 * torch.randn(5, lm.d_model)
    torch.testing.assert_close(loaded_sae.encode(x), sae.encode(x), rtol=0, atol=0)
    codes = sae.encode(x)
    assert (codes > 0).any()
    torch.testing.assert_close(loaded_sae.decode(codes), sae.decode(codes), rtol=0, atol=0)
    # cached unit-norm decoder rows equal W_dec row-normalised by hand
    expected = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(bank.decoder(Site(1, "resid_post")), expected)


def test_width_mismatch_is_refused(tmp_path, loaded):
    lm = loaded("gpt2")
    build_tiny_sae("topk", lm.d_model + 8, 32, "blocks.0.hook_resid_post").save_model(tmp_path / "wide")
    with pytest.raises(AuditError, match=r"d_in=72 but site 0/resid_post .* has width 64"):
        SAEBank.from_specs([str(tmp_path / "wide")], tmp_path, model=lm.model).attach(lm)


def test_unknown_release_is_a_clear_error(tmp_path):
    with pytest.raises(AuditError, match="unknown sae-lens release 'gpt2-small-res-jbb'.*did you mean"):
        SAEBank.from_specs(["gpt2-small-res-jbb:blocks.0.hook_resid_pre"], tmp_path)


def test_registry_glob_selects_layers_without_download(tmp_path):
    bank = SAEBank.from_specs(["gpt2-small-res-jb:blocks.1*.hook_resid_pre"], tmp_path)
    assert bank.sites == [Site(layer, "resid_pre") for layer in (1, 10, 11)]
    bank = SAEBank.from_specs(["gpt2-small-res-jb:blocks.{3..5}.hook_resid_pre"], tmp_path)
    assert bank.sites == [Site(layer, "resid_pre") for layer in (3, 4, 5)]
    with pytest.raises(AuditError, match="no SAE id"):
        SAEBank.from_specs(["gpt2-small-res-jb:nothing*"], tmp_path)


def test_pack_manifest_hashes_and_coverage(tiny_packs, tiny_models, tmp_path, loaded):
    lm = loaded("qwen2")
    pack = read_pack(tiny_packs["qwen2"])
    for site_text, entry in pack.manifest["saes"].items():
        assert weights_digest(pack.path / entry["path"]) == entry["sha256"], site_text
    bank = SAEBank.from_specs([str(tiny_packs["qwen2"])], tmp_path, model=lm.model).attach(lm)
    assert Site(0, "resid_pre") in bank and len(bank) == 1 + 3 * lm.n_layers
    assert {row["architecture"] for row in bank.describe()} == set(ARCHITECTURES)


def test_incomplete_or_missing_pack_never_loads(tiny_packs, tmp_path):
    manifest = json.loads((tiny_packs["gpt2"] / "pack.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pack.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(AuditError, match="incomplete"):
        SAEBank.from_specs([str(broken)], tmp_path)
    with pytest.raises(AuditError, match="demo SAE pack is not built"):
        SAEBank.from_specs(["demo"], tmp_path)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hook_z_decoder_projected_through_w_o(family, tmp_path, loaded):
    """The projected decoder row i is the attention output projection applied to z = d_i (no bias)."""
    lm = loaded(family)
    width = lm.n_heads * lm.d_head
    build_tiny_sae("standard", width, 40, "blocks.1.attn.hook_z").save_model(tmp_path / "z")
    bank = SAEBank.from_specs([str(tmp_path / "z")], tmp_path, model=lm.model).attach(lm)
    site = Site(1, "attn_z")
    out_proj = lm.model.get_submodule(f"{lm.adapter.layers}.1.{lm.adapter.out_proj}")
    w_dec = bank.sae(site).W_dec.detach()
    zero = out_proj(torch.zeros(1, width))
    by_module = out_proj(w_dec) - zero  # apply the real module, remove its bias
    by_module = by_module / by_module.norm(dim=1, keepdim=True)
    torch.testing.assert_close(bank.output_decoder(site), by_module, atol=1e-5, rtol=1e-5)
    assert bank.output_decoder(site).shape == (40, lm.d_model)
