"""Slow tier: steering a real latent on SmolLM2 has a real, monotone effect (no judge needed).

The latent of the last residual site of a pack (the demo pack, else `late`, a --quick pack of
layers 28-29, else any pack) whose logit-lens tokens form the largest word family (top token and
the others sharing its first four letters) is added with folded coefficients s in {0, 2, 4, 8};
the share of generated tokens from that family must rise with s. (At layers 12-13 of the --quick
pack the logit lens of the SAE latents does not predict what adding them does: no family token
appeared at any strength, even where the text broke down.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import user_pack, word_family_latent
from platformdirs import user_cache_dir

from auditui.engine.reference import TokenSeq, read_sites
from auditui.engine.saes import SAEBank
from auditui.engine.sampling import SamplingParams
from auditui.engine.steering import parse_plan, steered_samples, typical_activations

PROMPTS = ["Tell me about your day.", "Write a short note to a friend.", "What should I cook tonight?"]
STRENGTHS = [0.0, 2.0, 4.0, 8.0]


@pytest.mark.slow
def test_smollm2_adding_a_word_family_latent_raises_its_frequency_monotonically(smollm2):
    pack = user_pack()
    cache = Path(user_cache_dir("auditui"))
    bank = SAEBank.from_specs([str(pack)], cache, device=smollm2.device, model=smollm2.model).attach(smollm2)
    site = max(s for s in bank.sites if s.kind == "resid_post")
    latent, family = word_family_latent(smollm2, bank, site)
    assert len(family) >= 2, "no latent with a word family"
    seqs = [TokenSeq(tuple(ids), len(ids)) for ids in (smollm2.prompt_ids(p) for p in PROMPTS)]
    acts = torch.cat([a[site][b, 1:len(s)] for batch, _, a in read_sites(smollm2, seqs, [site])
                      for b, s in enumerate(batch)])
    typical = {site: typical_activations(bank, site, acts)}
    plan = parse_plan(f"{site}/{latent}:add:1", fold=True, scope="generated")
    shares = []
    for prompt in PROMPTS:
        run = steered_samples(smollm2, bank, smollm2.prompt_ids(prompt), plan, STRENGTHS, 4,
                              SamplingParams(temperature=0.7, max_new_tokens=24), seed=0, typical=typical)
        shares.append([_share(smollm2, run.group(s), family) for s in STRENGTHS])
    mean = [sum(col) / len(col) for col in zip(*shares)]
    print(f"\nlatent {site}/{latent} family {sorted(family)} (pack {pack.name}); share of family tokens "
          + ", ".join(f"s={s:g}: {m:.3f}" for s, m in zip(STRENGTHS, mean)))
    assert all(a <= b for a, b in zip(mean, mean[1:])) and mean[-1] > mean[0]


def _share(lm, samples, family: set[str]) -> float:
    tokens = [lm.tokenizer.decode([t]).strip().lower() for s in samples for t in s.token_ids]
    return sum(any(t.startswith(w[:4]) for w in family) and len(t) >= 4 for t in tokens) / max(1, len(tokens))
