"""Public test fixtures: tiny random models of each family and tiny sae-lens SAE packs, on disk.

Everything is built offline and saved to a directory, so tests (and users trying auditui without a
GPU) load it through the same code paths as real models and packs:

    model_dir = build_tiny_model("llama", tmp / "tiny-llama")
    pack_dir = build_tiny_pack(model_dir, tmp / "tiny-pack")
    auditui inspect --model tmp/tiny-llama --pack tmp/tiny-pack
"""

from __future__ import annotations

from pathlib import Path

import torch

from auditui.engine.saes import write_pack_manifest
from auditui.engine.sites import Site

FAMILIES = ("gpt2", "gpt_neox", "llama", "qwen2", "gemma2")
ARCHITECTURES = ("standard", "topk", "jumprelu")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_tokenizer(extra_tokens: int = 0):
    """A byte-level tokenizer (256 byte symbols + 3 specials, + `extra_tokens` more specials) with a
    ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS) + [f"<|extra_{i}|>" for i in range(extra_tokens)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                        pad_token=SPECIALS[0])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, vocab_size: int, n_layers: int = 3, d_model: int = 64):
    """A transformers config for a tiny model of `family` (4 heads; GQA where the family has it)."""
    from transformers import Gemma2Config, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=512, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=4,
                             intermediate_size=2 * d_model, max_position_embeddings=512,
                             use_parallel_residual=True, rotary_pct=0.5, **common)
    llama_like = dict(num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=2 * d_model, max_position_embeddings=512,
                      **common)
    if family == "llama":
        return LlamaConfig(tie_word_embeddings=True, **llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "gemma2":
        return Gemma2Config(head_dim=d_model // 4, sliding_window=64, **llama_like)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def build_tiny_model(family: str, out_dir: Path, seed: int = 0, n_layers: int = 3, d_model: int = 64,
                     init_std: float = 0.2, extra_tokens: int = 0) -> Path:
    """Save a random tiny model of `family` (+ tokenizer) to `out_dir` and return it.

    `init_std` is larger than the usual 0.02 so that random models have non-trivial, input-dependent
    activations and logits (a near-constant model makes every test pass vacuously). `extra_tokens`
    gives the tokenizer (and the embeddings) that many more tokens: another vocabulary.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = tiny_tokenizer(extra_tokens)
    config = tiny_config(family, len(tokenizer), n_layers, d_model)
    config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_planted_model(model_dir: Path, out_dir: Path, layer: int, direction: torch.Tensor, scale: float) -> Path:
    """A copy of the saved model `model_dir` whose layer-`layer` MLP adds `scale * direction` [d_model] to
    the residual stream at every token (on the bias of its output projection): it differs from the
    original only along that direction there. Families whose MLP output has a bias (gpt2, gpt_neox)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auditui.engine.sites import adapter_for

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = adapter_for(model)
    mlp = model.get_submodule(f"{adapter.layers}.{layer}.{adapter.mlp_out}")
    biased = [m for m in mlp.modules() if isinstance(getattr(m, "bias", None), torch.nn.Parameter)]
    if not biased:
        raise ValueError(f"the MLP of {adapter.name} has no output bias to plant a direction on")
    with torch.no_grad():
        biased[-1].bias += scale * direction.to(biased[-1].bias)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
    return out_dir


def build_tiny_sae(architecture: str, d_in: int, d_sae: int, hook_name: str, seed: int = 0,
                   model_name: str = "tiny", k: int = 8):
    """A sae-lens SAE with random unit-norm decoder rows and an encoder tied to it."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    metadata = SAEMetadata(hook_name=hook_name, model_name=model_name)
    if architecture == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    elif architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=metadata))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=metadata))
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose from {ARCHITECTURES}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w_dec = torch.randn(d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.zero_()
        sae.b_enc.copy_(-0.1 * torch.rand(d_sae, generator=gen))
        if architecture == "jumprelu":
            sae.threshold.copy_(0.05 + 0.05 * torch.rand(d_sae, generator=gen))
    return sae


def tiny_pack_sites(n_layers: int) -> list[Site]:
    """resid_pre of layer 0, then resid_post, attn_out and mlp_out of every layer."""
    return [Site(0, "resid_pre")] + [Site(layer, kind) for layer in range(n_layers)
                                     for kind in ("resid_post", "attn_out", "mlp_out")]


def build_tiny_pack(model_dir: Path, out_dir: Path, d_sae: int = 128, seed: int = 0,
                    sites: list[Site] | None = None, name: str = "tiny") -> Path:
    """Save one tiny SAE per site (architectures in rotation) and a pack.json; return the pack dir."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = {}
    for i, site in enumerate(sites or tiny_pack_sites(config.num_hidden_layers)):
        sae = build_tiny_sae(ARCHITECTURES[i % len(ARCHITECTURES)], config.hidden_size, d_sae,
                             site.hook_name, seed=seed * 1000 + i, model_name=Path(model_dir).name)
        sae_dir = out_dir / f"{site.kind}_{site.layer}"
        sae.save_model(sae_dir)
        saved[site] = sae_dir
    write_pack_manifest(out_dir, name, Path(model_dir).name, saved)
    return out_dir
