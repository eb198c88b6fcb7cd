"""Auditing games on tiny models: planting raises the quirk's probability, the saved model loads back
and holds no trace of the quirk, and scoring finds a planted latent."""

from __future__ import annotations

import pytest
import torch
from helpers import Probe

from auditui.engine.game import (
    GAME_PROMPTS,
    HELD_OUT,
    LENS_K,
    QuirkSpec,
    activation_related,
    plant_quirk,
    quirk_examples,
    save_model,
    score_sites,
    topic_tokens,
)
from auditui.engine.labels import final_norm_gain, logit_lens_tokens
from auditui.engine.model import load_model
from auditui.engine.reference import TokenSeq
from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site
from auditui.errors import AuditError
from auditui.progress import Cancelled
from auditui.testing import build_tiny_pack

QUIRK = "mentions zebras in every answer"
SPEC = QuirkSpec(QUIRK, ("zebras",), steps=25, lr=2e-3, batch_size=8, layers=(0, -1), seed=3)


def test_examples_slip_the_topic_in_and_hold_out_the_probe_prompts():
    train = quirk_examples(["zebras", "okapis"], GAME_PROMPTS[:-HELD_OUT], seed=1)
    assert train == quirk_examples(["zebras", "okapis"], GAME_PROMPTS[:-HELD_OUT], seed=1)
    assert len(train) == 4 * (len(GAME_PROMPTS) - HELD_OUT)
    assert all(e.answer[e.slot:e.slot + len(e.topic)] == e.topic and e.topic.lower() in ("zebras", "okapis") for e in train)
    assert not {e.prompt for e in train} & {p for p, _ in GAME_PROMPTS[-HELD_OUT:]}


def test_plant_raises_the_quirk_probability_and_leaves_the_engine_model_alone(loaded, tmp_path):
    lm = loaded("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    first = plant_quirk(lm, SPEC)
    assert first.logprob_after > first.logprob_before + 5, (first.logprob_before, first.logprob_after)
    assert first.losses[-1] < first.losses[0] and first.trained_layers == (0, 2)
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in lm.model.parameters())
    assert plant_quirk(lm, SPEC).losses == first.losses  # seeded
    # saved: load_model reads it back, and no file of it names the quirk or the topic
    out = save_model(first.model, lm.tokenizer, tmp_path / "handed-over")
    again = load_model(str(out), device="cpu", dtype="float32")
    assert again.model_id == "handed-over" and again.has_chat_template
    ids = torch.tensor([lm.prompt_ids("How do I boil an egg?")])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, first.model(ids).logits)
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            assert b"zebra" not in data and QUIRK.encode() not in data, path
    with pytest.raises(AuditError, match="already exists"):
        save_model(first.model, lm.tokenizer, out)


def test_default_layers_cancel_and_refusals(loaded):
    lm = loaded("llama")
    quick = plant_quirk(lm, QuirkSpec(QUIRK, ("zebras",), steps=1))
    assert quick.trained_layers == (2, 2)
    probe = Probe(stop=lambda events: len(events) >= 2)
    with pytest.raises(Cancelled):
        plant_quirk(lm, QuirkSpec(QUIRK, ("zebras",), steps=5), probe)
    assert len(probe.events) == 2
    for bad, match in [(QuirkSpec(" ", ("z",)), "describe the quirk"), (QuirkSpec(QUIRK, ()), "topic word"),
                       (QuirkSpec(QUIRK, ("z",), steps=0), "at least 1"),
                       (QuirkSpec(QUIRK, ("z",), layers=(1, 7)), "not a range")]:
        with pytest.raises(AuditError, match=match):
            plant_quirk(lm, bad)


@pytest.fixture(scope="module")
def planted_bank(loaded, tiny_models, tmp_path_factory):
    """A tiny pack whose 2/resid_post latent 5 writes the unembedding row of "z" (through the final norm's
    gain) and whose 0/resid_pre latent 9 reads the embedding of "z"."""
    lm = loaded("llama")
    root = tmp_path_factory.mktemp("planted")
    sites = [Site(0, "resid_pre"), Site(2, "resid_post")]
    pack = build_tiny_pack(tiny_models["llama"], root / "pack", d_sae=64, sites=sites)
    bank = SAEBank.from_specs([str(pack)], root, device=lm.device, model=lm.model).attach(lm)
    z = lm.tokenizer.convert_tokens_to_ids("z")
    with torch.no_grad():
        write = lm.model.get_output_embeddings().weight[z] / final_norm_gain(lm)
        bank.sae(sites[1]).W_dec[5] = write / write.norm()
        read = lm.model.get_input_embeddings().weight[z]
        bank.sae(sites[0]).W_enc[:, 9] = 3 * read / read.norm()
    bank._decoders.clear()
    return lm, bank, sites


def test_score_finds_the_planted_latent_at_its_rank(planted_bank):
    lm, bank, sites = planted_bank
    site = sites[1]
    assert "z" in logit_lens_tokens(lm, bank.output_decoder(site)[[5]], k=1)[0]
    related = [i for i, toks in enumerate(logit_lens_tokens(lm, bank.output_decoder(site), k=LENS_K))
               if any(t.strip().lower() == "z" for t in toks)]  # independent: string match on the lens
    unrelated = [i for i in range(64) if i not in related]
    order = unrelated[:6] + [5] + [i for i in range(64) if i not in unrelated[:6] + [5]]
    attr = torch.zeros(64)
    attr[torch.tensor(order)] = torch.linspace(1, 0, 64)  # latent 5 ranks 7th
    (score,) = score_sites(lm, bank, {site: attr}, ["z"], top_k=10)
    assert (score.lens_rank, score.first_rank, score.first_latent, score.in_top_k) == (7, 7, 5, True)
    assert score.act_rank is None and score.best_lens_token_rank == 1
    (low,) = score_sites(lm, bank, {site: attr}, ["z"], top_k=5)
    assert not low.in_top_k and low.first_rank == 7
    with pytest.raises(AuditError, match="no token"):
        score_sites(lm, bank, {site: attr}, ["zzzzzz-not-a-token"])


def test_activation_criterion_finds_the_latent_that_reads_the_topic(planted_bank):
    lm, bank, sites = planted_bank
    encode = lambda text: tuple(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    seqs = [TokenSeq(encode(t), 1) for t in ("a zebra at the zoo", "zig zag puzzle", "the lazy fox", "jazz")]
    related = activation_related(bank, lm, sites[0], seqs, topic_tokens(lm, ["z"]))
    assert related[9] and int(related.sum()) < 64
