"""Top-k transition tables between two SAEs, computed in memory-bounded chunks and cached on disk.

The transition table from site A to site B (seed 001, section 3.2) holds, for every latent i of A,
the K latents j of B whose unit decoder directions are most similar to d_i^(A), best first:

    values  [d_sae(A), K] float32   cos(d_i^(A), d_j^(B)), descending along K
    indices [d_sae(A), K] int64     the latents j of B

Both sides use `SAEBank.output_decoder` (unit rows in the residual space; attn_z decoders are
projected through W_O), so resid / mlp_out / attn_out / attn_z SAEs compare directly.

Building a table costs 2 * d_sae(A) * d_sae(B) * d_model FLOPs; rows of A go through the matmul in
chunks sized so that one chunk of similarities stays under `chunk_bytes` (64 MiB by default). Tables
are stored as CPU tensors (memory) and safetensors files (disk):

    <cache>/flow/<key(A)>-<key(B)>-k<K>.safetensors     (tensors "values", "indices")

where key(site) is the first 16 hex digits of the SAE's weight digest (`bank.digest`); for attn_z
SAEs it is a digest of the projected decoder, since that also depends on the model's W_O. Every table
stores K = max(k, TABLE_K) matches so one table serves graphs (k = 1) and the deactivation test
(top 5).

`TransitionCache.top(src, dst, latent, k)` is what graph walks call: a lookup in a table held in
memory or on disk, or, when no table was built, the single row computed directly (one
[d_sae(B), d_model] matrix-vector product, then memoized), so walks never wait for a full table.

When the cache folder cannot be written (read-only, full disk) a built table stays in memory only:
one RuntimeWarning per cache names the folder, and no later table is written there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import Tensor

from auditui.engine.saes import SAEBank
from auditui.engine.sites import Site

TABLE_K = 5
CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class Table:
    values: Tensor  # [n_src, K] float32 cosines, best first (CPU)
    indices: Tensor  # [n_src, K] int64 latents of the destination SAE (CPU)

    @property
    def k(self) -> int:
        return int(self.values.shape[1])

    def row(self, latent: int, k: int) -> list[tuple[int, float]]:
        """The top-k (latent, cosine) of source latent `latent`, best first."""
        return list(zip(self.indices[latent, :k].tolist(), self.values[latent, :k].tolist(), strict=True))


def top_cosines(src: Tensor, dst: Tensor, k: int, chunk_bytes: int = CHUNK_BYTES) -> Table:
    """Top-k of src [n, d] @ dst[m, d].T per row, computed `chunk_bytes` of similarities at a time."""
    k = min(k, dst.shape[0])
    rows = max(1, chunk_bytes // (4 * dst.shape[0]))
    values, indices = [], []
    with torch.no_grad():
        for start in range(0, src.shape[0], rows):
            sims = src[start:start + rows] @ dst.T  # [rows, m]
            top = sims.topk(k, dim=1)
            values.append(top.values.float().cpu())
            indices.append(top.indices.cpu())
    return Table(values=torch.cat(values), indices=torch.cat(indices))


class TransitionCache:
    """Transition tables of one SAE bank: memory, then disk (`root`), then computed."""

    def __init__(self, bank: SAEBank, root: Path | None, chunk_bytes: int = CHUNK_BYTES):
        self.bank = bank
        self.root = Path(root) if root is not None else None
        self.writable = True  # False after a failed write: tables stay in memory
        self.chunk_bytes = chunk_bytes
        self._tables: dict[tuple[Site, Site, int], Table] = {}
        self._keys: dict[Site, str] = {}
        self._rows: dict[tuple[Site, Site, int, int], list[tuple[int, float]]] = {}  # direct rows, memoized

    def key(self, site: Site) -> str:
        """16 hex digits naming the decoder directions of `site` (weights, and W_O for attn_z)."""
        if site not in self._keys:
            digest = self.bank.digest(site)
            if site.kind == "attn_z":
                projected = self.bank.output_decoder(site).detach().cpu().contiguous()
                digest = hashlib.sha256(digest.encode() + projected.numpy().tobytes()).hexdigest()
            self._keys[site] = digest[:16]
        return self._keys[site]

    def path(self, src: Site, dst: Site, k: int) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{self.key(src)}-{self.key(dst)}-k{k}.safetensors"

    @staticmethod
    def stored_k(k: int) -> int:
        return max(k, TABLE_K)

    def cached(self, src: Site, dst: Site, k: int = TABLE_K) -> Table | None:
        """The table if it is in memory or on disk (loaded into memory), else None."""
        slot = (src, dst, self.stored_k(k))
        if slot in self._tables:
            return self._tables[slot]
        path = self.path(*slot)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except Exception:  # a truncated or foreign file: rebuild it rather than fail
            return None
        self._tables[slot] = Table(values=tensors["values"], indices=tensors["indices"])
        return self._tables[slot]

    def table(self, src: Site, dst: Site, k: int = TABLE_K) -> Table:
        """The full table src -> dst (top max(k, TABLE_K)), built and saved when missing."""
        table = self.cached(src, dst, k)
        if table is None:
            slot = (src, dst, self.stored_k(k))
            table = top_cosines(self.bank.output_decoder(src), self.bank.output_decoder(dst), slot[2],
                                self.chunk_bytes)
            self._tables[slot] = table
            self._save(self.path(*slot), table)
        return table

    def _save(self, path: Path | None, table: Table) -> None:
        """Write a table atomically; on a write failure warn once and keep tables in memory only."""
        if path is None or not self.writable:
            return
        from safetensors.torch import save_file

        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"values": table.values.contiguous(), "indices": table.indices.contiguous()}, tmp)
            tmp.replace(path)
        except (OSError, SafetensorError) as exc:
            self.writable = False
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            warnings.warn(f"cannot cache transition tables in {path.parent} ({exc}); keeping them in memory",
                          RuntimeWarning, stacklevel=3)

    def top(self, src: Site, dst: Site, latent: int, k: int, build: bool = False) -> list[tuple[int, float]]:
        """Top-k (latent of dst, cosine) for `latent` of src: a table lookup, or one row computed."""
        table = self.table(src, dst, k) if build else self.cached(src, dst, k)
        if table is not None:
            return table.row(latent, k)
        slot = (src, dst, latent, self.stored_k(k))
        if slot not in self._rows:
            with torch.no_grad():
                direction = self.bank.output_decoder(src)[latent]  # [d_model]
                sims = self.bank.output_decoder(dst) @ direction  # [d_sae(dst)]
                top = sims.topk(min(slot[3], sims.shape[0]))
            self._rows[slot] = list(zip(top.indices.tolist(), top.values.float().tolist(), strict=True))
        return self._rows[slot][:k]
