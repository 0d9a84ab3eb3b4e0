"""Latent and text-embedding cache: run the VAE and text encoders once, not every step.

``diffalign cache CONFIG`` writes ``data.cache_dir``:

    index.json                 what was cached (model, resolution, data format, k, data fingerprint,
                               shard size)
    uncond.safetensors         the empty-prompt embedding (for caption dropout)
    shard-00000.safetensors    latents [n,k,C,h,w] (k=2 for pairs, winner first; a ranked set's k images
                               best first), micro [n,k,6] or [n,6], skipped [n], cond.<name> [n,...],
                               and for ranked sets phi [n,k], rank [n,k]

Shards are written to a temporary name and renamed, so an interrupted ``cache`` resumes at the
first missing shard. Training reads shards memory-mapped (``safe_open``), so memory stays flat.
Cached latents are exactly what the uncached path computes (posterior mean, center crop, no flip),
so a run gives the same loss either way (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config, ConfigError, DataConfig, ModelConfig
from .pairs import PairDataset

SHARD = "shard-{:05d}.safetensors"


def data_fingerprint(ds: Any) -> str:
    h = hashlib.sha256()
    for r in ds.rows:
        if isinstance(r, tuple):  # ranked: (file, row, prompt, phi, rank)
            h.update(f"{r[0]}:{r[1]}:{r[2]}:{r[3]}:{r[4]}\n".encode())
        else:
            h.update(f"{r.source}:{r.row}:{int(r.swap)}:{r.caption}\n".encode())
    return h.hexdigest()[:16]


def _kind(dcfg: DataConfig) -> str:
    return "ranked" if dcfg.format == "ranked" else "pairs"


def _source(dcfg: DataConfig, verbose: bool = True) -> Any:
    """The uncached dataset the cache mirrors (pairs or a ranked Syn-Pic set)."""
    if _kind(dcfg) == "ranked":
        from .ranked import RankedDataset

        return RankedDataset(dcfg, verbose=verbose)
    return PairDataset(dcfg, verbose=verbose)


def _check_cacheable(dcfg: DataConfig) -> None:
    if not dcfg.center_crop or dcfg.random_flip:
        raise ConfigError(
            "data.cache_dir: cached latents need data.center_crop=true and data.random_flip=false"
        )


def build_cache(cfg: Config, shard_size: int = 256) -> Path:
    from tqdm.auto import tqdm

    from .._quiet import quiet_libraries
    from ..models.loading import default_device, load_adapter

    quiet_libraries()
    if not cfg.data.cache_dir:
        raise ConfigError("data.cache_dir is not set: say where to write the cache (data.cache_dir=PATH)")
    _check_cacheable(cfg.data)
    out = Path(cfg.data.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    dcfg = replace(cfg.data, caption_dropout=0.0, cache_dir=None)
    ds = _source(dcfg)
    ranked = _kind(cfg.data) == "ranked"
    device = default_device()
    adapter = load_adapter(cfg.model, device)
    index = {
        "num_rows": len(ds),
        "format": _kind(cfg.data),
        "k": ds.k,
        "shard_size": shard_size,
        "model_path": cfg.model.path,
        "family": adapter.family,
        "resolution": cfg.data.resolution,
        "data_fingerprint": data_fingerprint(ds),
    }
    old = out / "index.json"
    if old.exists() and json.loads(old.read_text()) != index:
        raise ConfigError(
            f"{out}: holds a cache of other data or another model; choose an empty data.cache_dir"
        )
    old.write_text(json.dumps(index, indent=2))
    save_file(
        {k: v.cpu().contiguous() for k, v in adapter.encode_prompts([""]).items()}, out / "uncond.safetensors"
    )
    n_shards = (len(ds) + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc="cache", unit="shard"):
        path = out / SHARD.format(s)
        if path.exists():
            continue  # resumed
        idx = range(s * shard_size, min(len(ds), (s + 1) * shard_size))
        lat, cond, micro, skipped, extra = [], [], [], [], []
        for chunk in (list(idx)[i : i + 16] for i in range(0, len(idx), 16)):
            items = [ds[(i, 0)] for i in chunk]
            pix = torch.stack([it["pixels"] for it in items])  # [b,k,3,R,R]
            lat.append(adapter.encode_images(pix.flatten(0, 1).to(device)).unflatten(0, pix.shape[:2]).cpu())
            cond.append(
                {k: v.cpu() for k, v in adapter.encode_prompts([it["caption"] for it in items]).items()}
            )
            micro.append(torch.stack([it["micro"] for it in items]))
            skipped.append(torch.tensor([it["skipped"] for it in items]))
            if ranked:
                extra.append({n: torch.stack([it[n] for it in items]) for n in ("phi", "rank")})
        tensors = {"latents": torch.cat(lat), "micro": torch.cat(micro), "skipped": torch.cat(skipped)}
        for n in ("phi", "rank") if ranked else ():
            tensors[n] = torch.cat([e[n] for e in extra])
        for k in cond[0]:
            tensors[f"cond.{k}"] = torch.cat([c[k] for c in cond])
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    print(f"cached {len(ds)} {'ranked groups' if ranked else 'pairs'} in {n_shards} shards at {out}")
    return out


class CachedPairs(torch.utils.data.Dataset):
    """Reads a cache built by ``build_cache``; items mirror ``PairDataset`` (or ``RankedDataset``) with
    latents instead of pixels."""

    def __init__(self, dcfg: DataConfig, mcfg: ModelConfig) -> None:
        _check_cacheable(dcfg)
        root = Path(dcfg.cache_dir or "")
        if not (root / "index.json").exists():
            raise ConfigError(
                f"data.cache_dir {str(root)!r} has no index.json: run `diffalign cache CONFIG` first"
            )
        self.index = json.loads((root / "index.json").read_text())
        src = _source(replace(dcfg, cache_dir=None), verbose=False)  # light columns only: no image decoding
        expect = {
            "model_path": mcfg.path,
            "resolution": dcfg.resolution,
            "format": _kind(dcfg),
            "data_fingerprint": data_fingerprint(src),
            "num_rows": len(src),
        }
        for k, v in expect.items():
            if self.index.get(k) != v:
                raise ConfigError(
                    f"data.cache_dir {str(root)!r} is stale: {k} is {self.index.get(k)!r} there, "
                    f"{v!r} now; rebuild it"
                )
        self.k = self.index["k"]
        n_shards = (len(src) + self.index["shard_size"] - 1) // self.index["shard_size"]
        missing = [s for s in range(n_shards) if not (root / SHARD.format(s)).exists()]
        if missing:
            raise ConfigError(
                f"data.cache_dir {str(root)!r} is incomplete ({len(missing)} shards missing): "
                f"rerun `diffalign cache`"
            )
        # PairDataset takes the next row's caption for a skipped (broken) pair;
        # ranked rows are never skipped here
        self.root, self.cfg = root, dcfg
        self.captions = [r[2] for r in src.rows] if _kind(dcfg) == "ranked" else [r.caption for r in src.rows]
        self.uncond: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.index["num_rows"]

    has_scores = False  # reward scores are not cached; objectives that need them read the pairs directly

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        s, r = divmod(index, self.index["shard_size"])
        with safe_open(str(self.root / SHARD.format(s)), framework="pt") as f:
            row = {k: f.get_slice(k)[r : r + 1][0] for k in f.keys()}
        cond = {k[5:]: v for k, v in row.items() if k.startswith("cond.")}
        caption = self.captions[(index + int(row["skipped"])) % len(self.captions)]
        gen = torch.Generator().manual_seed(seed)  # same draw order as PairDataset (no crop/flip draws)
        if self.cfg.caption_dropout > 0 and bool(torch.rand((), generator=gen) < self.cfg.caption_dropout):
            if self.uncond is None:
                with safe_open(str(self.root / "uncond.safetensors"), framework="pt") as f:
                    self.uncond = {k: f.get_tensor(k)[0] for k in f.keys()}
            cond, caption = dict(self.uncond), ""
        item = {
            "latents": row["latents"],
            "cond": cond,
            "micro": row["micro"],
            "caption": caption,
            "seed": seed,
            "index": index,
            "skipped": int(row["skipped"]),
        }
        item.update({n: row[n] for n in ("phi", "rank") if n in row})
        return item
