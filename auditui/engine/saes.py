"""SAEBank: sae-lens SAEs keyed by Site, loaded only through sae-lens.

Sources (one string each, several may be combined):
  * a pack directory holding `pack.json` (or a named pack under `<cache>/packs/NAME`, e.g. `demo`)
  * a sae-lens registry entry `RELEASE:SAE_ID`; SAE_ID may be a glob (`RELEASE:layer_*`), hold an
    integer range (`RELEASE:blocks.{3..5}.hook_resid_pre`) or be omitted (all SAEs of the release)
  * a Hugging Face repo `hf:OWNER/REPO[/SUBDIR]` (needs the hub, or its local cache)
  * a local directory saved by `SAE.save_model` (cfg.json + weights), or a directory of those

SAEs load lazily on first use; unit-norm decoder rows are cached on the engine device. Each SAE's
`d_in` is checked against the width of its site in the loaded model.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from auditui.engine.model import file_digest
from auditui.engine.sites import Site, site_from_hook_name
from auditui.errors import AuditError

if TYPE_CHECKING:
    from sae_lens import SAE

    from auditui.engine.model import LoadedModel

PACK_FORMAT = "auditui-pack/1"
MANIFEST = "pack.json"
WEIGHTS = "sae_weights.safetensors"


@dataclass
class SAESource:
    """How to load one SAE: a local directory or a registry (release, sae_id)."""

    site: Site
    path: Path | None = None
    release: str | None = None
    sae_id: str | None = None
    digest: str = ""  # sha256 of the weights file, when known
    info: dict = field(default_factory=dict)  # quality numbers etc. from a pack manifest

    @property
    def label(self) -> str:
        return str(self.path) if self.path else f"{self.release}:{self.sae_id}"


@dataclass
class PackInfo:
    name: str
    path: Path
    model_id: str
    manifest: dict


def weights_digest(sae_dir: Path) -> str:
    """sha256 of a saved SAE's weights file."""
    return file_digest(sae_dir / WEIGHTS)


def read_cfg(sae_dir: Path) -> dict:
    try:
        return json.loads((sae_dir / "cfg.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"{sae_dir} is not a saved sae-lens SAE (cfg.json: {exc})") from None


def packs_root(cache_dir: Path) -> Path:
    return cache_dir / "packs"


def check_pack_name(name: str) -> str:
    """A pack name is one folder name under <cache>/packs: letters, digits, '.', '_', '-'."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name or "") or ".." in name:
        raise AuditError(f"pack name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (a folder name, "
                         "no path); give a directory with --pack to use a pack elsewhere")
    return name


def _check_manifest(pack_dir: Path, manifest: object) -> dict:
    """The manifest's shape, and every SAE path inside the pack folder."""
    where = pack_dir / MANIFEST
    if not isinstance(manifest, dict) or not isinstance(manifest.get("saes"), dict):
        raise AuditError(f"{where} has no 'saes' mapping of site -> SAE entry")
    root = pack_dir.resolve()
    for site, entry in manifest["saes"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise AuditError(f"{where}: the entry of {site!r} has no 'path'")
        if not (root / entry["path"]).resolve().is_relative_to(root):
            raise AuditError(f"{where}: the SAE path of {site} ({entry['path']!r}) leaves the pack folder")
    return manifest


def resolve_pack_dir(spec: str, cache_dir: Path) -> Path:
    """A pack given as a directory, or by name under `<cache>/packs/`."""
    path = Path(spec).expanduser()
    if (path / MANIFEST).exists():
        return path
    named = packs_root(cache_dir) / spec
    if (named / MANIFEST).exists():
        return named
    if spec == "demo":
        raise AuditError("the demo SAE pack is not built yet; run: auditui pack build demo")
    raise AuditError(f"no SAE pack at {spec!r} (no {MANIFEST} there nor under {packs_root(cache_dir)})")


def read_pack(pack_dir: Path) -> PackInfo:
    try:
        manifest = json.loads((pack_dir / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuditError(f"cannot read {pack_dir / MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        raise AuditError(f"{pack_dir / MANIFEST} is not an auditui pack manifest")
    if not manifest.get("complete", False):
        raise AuditError(f"pack {pack_dir} is incomplete (an interrupted build); rebuild it")
    return PackInfo(name=str(manifest.get("name", pack_dir.name)), path=pack_dir,
                    model_id=str(manifest.get("model_id", "")), manifest=_check_manifest(pack_dir, manifest))


def write_pack_manifest(pack_dir: Path, name: str, model_id: str, saes: dict[Site, Path],
                        extra: dict | None = None, info: dict[Site, dict] | None = None) -> Path:
    """Write pack.json for SAEs saved under `pack_dir` (paths relative), with weight hashes."""
    entries = {}
    for site, sae_dir in sorted(saes.items()):
        cfg = read_cfg(sae_dir)
        entries[str(site)] = {"path": str(sae_dir.relative_to(pack_dir)), "sha256": weights_digest(sae_dir),
                              "architecture": cfg.get("architecture"), "d_in": cfg.get("d_in"),
                              "d_sae": cfg.get("d_sae"), **((info or {}).get(site, {}))}
    manifest = {"format": PACK_FORMAT, "name": name, "model_id": model_id, "complete": True,
                "saes": entries, **(extra or {})}
    tmp = pack_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(pack_dir / MANIFEST)
    return pack_dir / MANIFEST


def _registry() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def registry_sources(spec: str) -> list[SAESource]:
    """`RELEASE[:SAE_ID_GLOB]` -> sources, with sites from each SAE's hook name in the registry."""
    release, _, pattern = spec.partition(":")
    directory = _registry()
    if release not in directory:
        close = difflib.get_close_matches(release, list(directory), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise AuditError(f"unknown sae-lens release {release!r}{hint}")
    lookup = directory[release]
    patterns = expand_ranges(pattern or "*")
    ids = [i for i in lookup.saes_map if any(fnmatch.fnmatchcase(i, p) for p in patterns)]
    if not ids:
        raise AuditError(f"no SAE id in release {release!r} matches {pattern!r}")
    sources = []
    for sae_id in ids:
        hook = _registry_hook_name(release, sae_id)
        sources.append(SAESource(site=site_from_hook_name(hook), release=release, sae_id=sae_id))
    return sources


MAX_RANGE = 1000  # values of one {A..B} range of SAE ids


def expand_ranges(pattern: str) -> list[str]:
    """Expand `{A..B}` integer ranges: `layer_{3..5}/*` -> `layer_3/*`, `layer_4/*`, `layer_5/*`."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = int(match.group(1)), int(match.group(2))
    if not 0 <= hi - lo < MAX_RANGE:
        raise AuditError(f"the range {{{lo}..{hi}}} must run upwards over at most {MAX_RANGE} values")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [p for n in range(lo, hi + 1) for p in expand_ranges(f"{head}{n}{tail}")]


def _registry_hook_name(release: str, sae_id: str) -> str:
    """The hook name of a registry SAE: the id itself when it is one, else its config on the hub."""
    from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

    if sae_id.startswith("blocks."):
        return sae_id
    try:
        cfg = load_sae_config_from_huggingface(release, sae_id=sae_id)
    except Exception as exc:  # network / cache errors from the hub client
        raise AuditError(f"cannot read the config of {release}:{sae_id} "
                         f"(hub unreachable and not cached?): {str(exc).splitlines()[0]}") from None
    hook = cfg.get("hook_name") or cfg.get("metadata", {}).get("hook_name")
    if not hook:
        raise AuditError(f"{release}:{sae_id} does not say which hook it reads")
    return hook


def directory_sources(path: Path, model: torch.nn.Module | None = None) -> list[SAESource]:
    """A saved SAE directory (cfg.json) or a directory whose subdirectories are saved SAEs."""
    sae_dirs = [path] if (path / "cfg.json").exists() else sorted(p.parent for p in path.glob("*/cfg.json"))
    if not sae_dirs:
        raise AuditError(f"no saved SAE under {path} (expected cfg.json + {WEIGHTS})")
    sources = []
    for sae_dir in sae_dirs:
        cfg = read_cfg(sae_dir)
        hook = cfg.get("metadata", {}).get("hook_name") or cfg.get("hook_name")
        if not hook:
            raise AuditError(f"{sae_dir}/cfg.json has no metadata.hook_name; cannot tell its site")
        sources.append(SAESource(site=site_from_hook_name(hook, model), path=sae_dir))
    return sources


def pack_sources(pack: PackInfo) -> list[SAESource]:
    sources = []
    for site_text, entry in pack.manifest["saes"].items():
        info = {k: v for k, v in entry.items() if k not in ("path", "sha256")}
        sources.append(SAESource(site=Site.parse(site_text), path=pack.path / entry["path"],
                                 digest=entry.get("sha256", ""), info=info))
    return sources


def hf_sources(spec: str, model: torch.nn.Module | None = None) -> list[SAESource]:
    """`hf:OWNER/REPO[/SUBDIR]`: fetch (or read the hub cache) and load as local directories."""
    from huggingface_hub import snapshot_download

    repo_path = spec.removeprefix("hf:")
    parts = repo_path.split("/")
    if len(parts) < 2:
        raise AuditError(f"write a Hugging Face SAE source as hf:OWNER/REPO[/SUBDIR], not {spec!r}")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        root = Path(snapshot_download(repo, allow_patterns=[f"{sub}/*" if sub else "*"]))
    except Exception as exc:  # hub client raises many types (offline, 404, auth)
        raise AuditError(f"cannot fetch {repo} from the hub: {str(exc).splitlines()[0]}") from None
    return directory_sources(root / sub if sub else root, model)


class SAEBank:
    """SAEs by site, loaded lazily through sae-lens; unit-norm decoders cached on `device`."""

    def __init__(self, sources: list[SAESource], device: torch.device | str = "cpu",
                 pack: PackInfo | None = None):
        self.device = torch.device(device)
        self.pack = pack
        self.sources: dict[Site, SAESource] = {}
        for source in sources:
            if source.site in self.sources:
                raise AuditError(f"two SAEs for site {source.site}: {self.sources[source.site].label} "
                                 f"and {source.label}")
            self.sources[source.site] = source
        self._saes: dict[Site, SAE] = {}
        self._decoders: dict[Site, Tensor] = {}
        self._projected: dict[Site, Tensor] = {}
        self.warnings: list[str] = []
        self._lm: LoadedModel | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs: list[str], cache_dir: Path, device: torch.device | str = "cpu",
                   model: torch.nn.Module | None = None) -> SAEBank:
        """Build a bank from user source strings (see module docstring)."""
        sources: list[SAESource] = []
        pack = None
        for spec in specs:
            path = Path(spec).expanduser()
            if spec.startswith("hf:"):
                sources += hf_sources(spec, model)
            elif (path / MANIFEST).exists() or (not path.exists() and ":" not in spec):
                pack = read_pack(resolve_pack_dir(spec, cache_dir))
                sources += pack_sources(pack)
            elif path.is_dir():
                sources += directory_sources(path, model)
            else:
                sources += registry_sources(spec)
        return cls(sources, device=device, pack=pack)

    def attach(self, lm: LoadedModel) -> SAEBank:
        """Check every SAE's width against `lm` (reads cfg.json only) and remember the model."""
        self._lm = lm
        for site, source in self.sources.items():
            if site.layer >= lm.n_layers:
                raise AuditError(f"SAE {source.label} reads {site}, but {lm.model_id} has {lm.n_layers} layers")
            if source.path is not None:
                d_in = read_cfg(source.path).get("d_in")
                if not isinstance(d_in, int):
                    raise AuditError(f"{source.path}/cfg.json has no integer d_in")
                self._check_width(site, d_in, source.label, lm)
        if self.pack and self.pack.model_id and self.pack.model_id != lm.model_id:
            self.warnings.append(f"pack {self.pack.name} was built for {self.pack.model_id}, "
                                 f"not {lm.model_id}")
        return self

    @staticmethod
    def _check_width(site: Site, d_in: int, label: str, lm: LoadedModel) -> None:
        width = lm.site_width(site.kind)
        if d_in != width:
            raise AuditError(f"SAE {label} has d_in={d_in} but site {site} of {lm.model_id} "
                             f"has width {width}; it was trained on another model or site")

    # -- access --------------------------------------------------------------------------------
    def __contains__(self, site: Site) -> bool:
        return site in self.sources

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def sites(self) -> list[Site]:
        return sorted(self.sources)

    def sae(self, site: Site) -> SAE:
        """The sae-lens SAE of `site` (loaded on first use, on the bank device, float32)."""
        if site not in self.sources:
            raise AuditError(f"no SAE loaded for site {site}")
        if site not in self._saes:
            self._saes[site] = self._load(self.sources[site])
        return self._saes[site]

    def _load(self, source: SAESource) -> SAE:
        from sae_lens import SAE

        if source.path is not None and source.digest and weights_digest(source.path) != source.digest:
            raise AuditError(f"SAE {source.label} at {source.path} does not match the sha256 in its pack "
                             "manifest (changed or damaged); rebuild the pack")
        try:
            if source.path is not None:
                sae = SAE.load_from_disk(source.path, device=str(self.device), dtype="float32")
            else:
                sae = SAE.from_pretrained(source.release, source.sae_id, device=str(self.device),
                                          dtype="float32")
        except AuditError:
            raise
        except Exception as exc:  # sae-lens / hub errors
            raise AuditError(f"cannot load SAE {source.label}: {str(exc).splitlines()[0]}") from None
        kwargs = sae.cfg.metadata.get("model_from_pretrained_kwargs") or {}
        if kwargs.get("center_writing_weights") or kwargs.get("fold_ln"):
            self.warnings.append(f"SAE {source.label} was trained on TransformerLens-processed weights "
                                 f"({kwargs}); its directions may be offset for the raw HF model")
        if self._lm is not None:
            self._check_width(source.site, sae.cfg.d_in, source.label, self._lm)
        if source.path is not None and not source.digest:
            source.digest = weights_digest(source.path)
        return sae

    def digest(self, site: Site) -> str:
        """A content hash identifying the SAE of `site` (for caches keyed by SAE weights)."""
        source = self.sources[site]
        if not source.digest:
            if source.path is not None:
                source.digest = weights_digest(source.path)
            else:
                source.digest = hashlib.sha256(source.label.encode()).hexdigest()
        return source.digest

    def decoder(self, site: Site) -> Tensor:
        """Unit-norm decoder directions [d_sae, width] of `site`, cached on the bank device."""
        if site not in self._decoders:
            w_dec = self.sae(site).W_dec.detach().float()  # [d_sae, width]
            self._decoders[site] = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._decoders[site]

    def output_decoder(self, site: Site) -> Tensor:
        """Unit-norm decoder directions [d_sae, d_model] in the residual space.

        Same as `decoder` except for `attn_z` SAEs, whose decoder [d_sae, n_heads*d_head] is
        projected through the attention output matrix W_O (bias excluded) into d_model.
        """
        if site.kind != "attn_z":
            return self.decoder(site)
        if site not in self._projected:
            if self._lm is None:
                raise AuditError("attach a model to the SAE bank to project hook_z decoders through W_O")
            w_o = out_projection(self._lm, site.layer).to(self.device)  # [n_heads*d_head, d_model]
            projected = self.sae(site).W_dec.detach().float() @ w_o  # [d_sae, d_model]
            self._projected[site] = projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self._projected[site]

    def describe(self) -> list[dict]:
        """One row per SAE from its cfg (no weights loaded for local SAEs)."""
        rows = []
        for site in self.sites:
            source = self.sources[site]
            cfg = read_cfg(source.path) if source.path else {}
            rows.append({"site": str(site), "source": source.label,
                         "architecture": cfg.get("architecture", source.info.get("architecture")),
                         "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"),
                         "hook_name": cfg.get("metadata", {}).get("hook_name", site.hook_name),
                         **{k: v for k, v in source.info.items() if k not in ("architecture", "d_in", "d_sae")}})
        return rows


def out_projection(lm: LoadedModel, layer: int) -> Tensor:
    """The attention output matrix of `layer` as [n_heads*d_head, d_model] (z @ W_O), float32."""
    from auditui.engine.head_weights import head_weights

    w_o = head_weights(lm.model, layer).w_o  # [n_heads, d_head, d_model]
    return w_o.reshape(-1, w_o.shape[-1]).float()
