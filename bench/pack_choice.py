"""Which demo pack buys most for a CPU budget: built packs side by side on the sites they share.

    .venv/bin/python bench/pack_choice.py all resid resid4k [--layers 20-29]

Build the packs first with the same `--minutes` (e.g. `pack build resid --kinds resid_post`). Per
pack: tokens per SAE, the medians at the shared resid_post sites of the layers (held-out variance
explained, dead fraction; CE recovered over the sites where every pack has it, as a budget may skip
some), and how many of TOPICS one site's dictionary represents, data free: a topic counts at a site
when one of its latents has a topic token as its top logit-lens token (top 1), or in its top 10 (a weak
test: many latents x 10 tokens cover much of the vocabulary). Averaged over the sites.
#18's auditor ran this by hand: the demo pack's best whale latent ranked " whale" 67th.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from auditui.config import load_settings
from auditui.engine.game import topic_tokens
from auditui.engine.labels import through_final_norm, unit_unembedding
from auditui.engine.model import load_model
from auditui.engine.packs import parse_layers
from auditui.engine.saes import SAEBank, read_pack, resolve_pack_dir
from auditui.engine.sites import Site

TOPICS = ("whale", "volcano", "pizza", "guitar", "football", "planet", "dragon", "chocolate", "violin",
          "castle", "pirate", "rocket", "coffee", "penguin", "tornado", "diamond", "wizard", "banana",
          "submarine", "cathedral", "dinosaur", "telescope", "jungle", "samurai", "glacier", "honey",
          "tiger", "medicine", "election", "recipe")


@torch.no_grad()
def best_topic_ranks(lm, w_dec: torch.Tensor, topic_ids: dict[str, torch.Tensor], top: int = 10) -> dict:
    """Per topic: the best logit-lens rank (1 = top token) of any of its tokens over the latents of
    `w_dec` [d_sae, d_model], or top + 1 when no latent has one in its top `top`."""
    w_u = unit_unembedding(lm)  # [vocab, d_model]
    best = dict.fromkeys(topic_ids, top + 1)
    for start in range(0, len(w_dec), 512):
        block = through_final_norm(lm, w_dec[start:start + 512])  # [c, d_model]
        tops = (block @ w_u.T).topk(top, dim=1).indices.cpu()  # [c, top] token ids, best first
        for topic, ids in topic_ids.items():
            hit = torch.isin(tops, ids)  # [c, top]
            if hit.any():
                best[topic] = min(best[topic], 1 + int(hit.float().argmax(dim=1)[hit.any(dim=1)].min()))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("packs", nargs="+")
    parser.add_argument("--layers", default="20-29", help="resid_post sites of these layers are compared")
    args = parser.parse_args()
    settings = load_settings()
    packs = [read_pack(resolve_pack_dir(name, settings.cache_path)) for name in args.packs]
    layers = set(parse_layers(args.layers))
    shared = [str(site) for site in sorted(set.intersection(*({Site.parse(s) for s in p.manifest["saes"]} for p in packs)))
              if site.kind == "resid_post" and site.layer in layers]

    def measured(key: str) -> list[str]:  # the shared sites where every pack has a finite `key`
        return [s for s in shared if all(isinstance(v := p.manifest["saes"][s].get(key), float | int) and not math.isnan(v)
                                         for p in packs)]
    sites_of = {key: measured(key) for key in ("variance_explained", "dead_fraction", "ce_recovered")}
    lm = load_model(packs[0].manifest["plan"]["model"], settings.device, settings.dtype, settings.cache_path)
    topic_ids = {topic: topic_tokens(lm, [topic]) for topic in TOPICS}  # [n] per topic
    print(f"{len(shared)} shared resid_post sites ({shared[0]}..{shared[-1]}), CE recovered at "
          f"{len(sites_of['ce_recovered'])} of them, {len(TOPICS)} topics")
    print("pack      SAEs  width  tokens/SAE  build s  var expl  dead   CE rec  topics per site: top 1  top 10")
    for pack in packs:
        saes, training = pack.manifest["saes"], pack.manifest["training"]
        bank = SAEBank.from_specs([str(pack.path)], settings.cache_path, device=lm.device, model=lm.model)
        ranks = [best_topic_ranks(lm, bank.decoder(site), topic_ids).values() for site in bank.sites
                 if str(site) in shared]
        top1, top10 = (statistics.mean(sum(r <= cut for r in site) for site in ranks) for cut in (1, 10))
        med = {key: statistics.median([saes[s][key] for s in sites] or [math.nan]) for key, sites in sites_of.items()}
        print(f"{pack.name:9s} {len(saes):4d}  {saes[shared[0]]['d_sae']:5d}  {training['tokens_per_sae']:10,d}  "
              f"{training['build_seconds']:7.0f}  {med['variance_explained']:8.3f}  {med['dead_fraction']:.3f}  "
              f"{med['ce_recovered']:6.3f}  {top1:21.1f}  {top10:6.1f}  (of {len(TOPICS)})")


if __name__ == "__main__":
    main()
