"""Latent and text-embedding cache: run the VAE and text encoders once, not every step.

``diffalign cache CONFIG`` writes ``data.cache_dir``:

    index.json                 what was cached and from what (see "Identity" below): data format, k,
                               resolution, shard size, the row fingerprint, every source file and every
                               file of the model components that produced the latents and embeddings
    uncond.safetensors         the empty-prompt embedding (for caption dropout)
    shard-00000.safetensors    latents [n,k,C,h,w] (k=2 for pairs, winner first; a ranked set's k images
                               best first), micro [n,k,6] or [n,6], skipped [n], cond.<name> [n,...],
                               and for ranked sets phi [n,k], rank [n,k]

Identity (content-addressed). ``index.json`` records, besides the settings:

- ``data_files``: every file the cached rows were read from (parquet files, ranked Syn-Pic shards,
  the JSONL file and the images it names, folder images, a ``datasets`` folder's arrow files), each
  as ``[resolved path, size, mtime_ns, sha256 of the whole file]``;
- ``model``: for the components that make the cache (``vae``, ``text_encoder*``, ``tokenizer*``, and
  ``pipeline``: ``model_index.json`` + ``diffalign.json``, which carry the mel front end and the
  conditioning mode), every file of the component folder as ``[name, resolved path, size, mtime_ns,
  sha256]``, read from model.path (a hub id: its snapshot folder in the local hub cache, offline).

Whole files are SHA-256 hashed (streamed) once, when the cache is built; the build reads all of the
data anyway. At training start and on a ``diffalign cache`` rerun every file is stat-ed: a file at the
recorded path with the recorded size and mtime (nanoseconds) is taken as unchanged, so the check
costs a stat per file, not a pass over hundreds of GB of parquet; any other file in its place (another
path, a rewritten file, a moved copy) is hashed again and must have the recorded content. So another
parquet with the same captions, or VAE weights changed since, is refused in one line naming the file;
a copy with the same bytes is accepted (slowly: it is re-hashed at every start; ``cp -p`` keeps the
mtime). The rows themselves (captions, labels, order) are compared through ``data_fingerprint``. The
model's path string is recorded but not compared: the content is. A cache written before identities
were recorded (no ``version``) is refused: it cannot be checked.

Shards and the index are written to a temporary name and renamed, so a killed ``cache`` (even
``kill -9``) resumes at the first missing shard and ends byte-identical to an uninterrupted run
(tested). The index is written before any shard, so a build that finds shards but no index (the
index deleted by hand) refuses in one line rather than file old latents under a new identity.
Training reads shards memory-mapped (``safe_open``), so memory stays flat. Cached latents
are exactly what the uncached path computes (posterior mean, center crop, no flip), so a run gives the
same loss either way (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config, ConfigError, DataConfig, ModelConfig
from ..files import sha256_file, write_atomic
from ..synpic import WEIGHT_SUFFIXES
from .pairs import PairDataset, ParquetImages

SHARD = "shard-{:05d}.safetensors"
VERSION = 2  # an index without "version" (written before identities were recorded) is refused
# the pipeline parts whose outputs are cached (the denoiser and scheduler are not)
CACHE_COMPONENTS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
PIPELINE_FILES = ("model_index.json", "diffalign.json")  # pipeline class; mel front end, conditioning
FIX = "rebuild it with `diffalign cache` into an empty data.cache_dir (or delete this one first)"


def data_fingerprint(ds: Any) -> str:
    """The rows (source, row, label order, caption), not their bytes: see ``data_files`` for those."""
    h = hashlib.sha256()
    for r in ds.rows:
        if isinstance(r, tuple):  # ranked: (file, row, prompt, phi, rank)
            h.update(f"{r[0]}:{r[1]}:{r[2]}:{r[3]}:{r[4]}\n".encode())
        else:
            h.update(f"{r.source}:{r.row}:{int(r.swap)}:{r.caption}\n".encode())
    return h.hexdigest()[:16]


def _kind(dcfg: DataConfig) -> str:
    return "ranked" if dcfg.format == "ranked" else "pairs"


def images_dataset(dcfg: DataConfig, verbose: bool = True) -> Any:
    """The uncached dataset, read from its images (pairs or a ranked Syn-Pic set); a cache mirrors it."""
    if _kind(dcfg) == "ranked":
        from .ranked import RankedDataset

        return RankedDataset(dcfg, verbose=verbose)
    return PairDataset(dcfg, verbose=verbose)


def _check_cacheable(dcfg: DataConfig) -> None:
    if not dcfg.center_crop or dcfg.random_flip:
        raise ConfigError(
            "data.cache_dir: cached latents need data.center_crop=true and data.random_flip=false"
        )


# ----------------------------------------------------------------------------- identity


def _record(path: Path) -> list[Any]:
    """``[resolved path, size, mtime_ns, sha256]`` of one file (a JSONL may name a missing image, which
    training skips: recorded as size -1, so it must stay missing)."""
    if not path.is_file():
        return [str(path.resolve()), -1, 0, ""]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, sha256_file(path)]


def _now(rec: list[Any], path: Path) -> tuple[int, str | None]:
    """Size and sha256 of ``path`` now; the sha256 is the recorded one, unread, when the file is the
    recorded path with the recorded size and mtime (the cheap check), and None when the size alone
    shows the content differs."""
    if not path.is_file():
        return -1, ""
    st = path.stat()
    old_path, size, mtime_ns, sha = rec
    if st.st_size != size:
        return st.st_size, None
    if st.st_mtime_ns == mtime_ns and str(path.resolve()) == old_path:
        return size, sha
    return size, sha256_file(path)


def source_files(ds: Any) -> list[Path]:
    """Every file the dataset's rows read, in a fixed order (files referenced by no row are left out,
    so ``data.max_pairs`` on a large folder hashes only what it uses)."""
    images = ds._images
    if isinstance(images, ParquetImages):  # Pick-a-Pic parquet or a ranked Syn-Pic set
        used = sorted({r[0] if isinstance(r, tuple) else r.source for r in ds.rows})
        return [Path(images.files[s]) for s in used]
    if ds.format == "hf":
        files = [Path(c["filename"]) for c in getattr(images, "cache_files", [])]
        if not files:
            raise ConfigError(
                f"data.path {ds.cfg.path!r}: this datasets source has no files on disk, so a cache of it "
                "cannot record what it was built from; save_to_disk it and point data.path at the folder"
            )
        return files
    out = [Path(ds.cfg.path).expanduser()] if ds.format == "jsonl" else []  # the JSONL itself
    for r in ds.rows:  # JSONL / folder: the image files of the rows, once each
        out.extend(images[r.source])
    return list(dict.fromkeys(out))


def _model_root(mcfg: ModelConfig) -> Path:
    p = Path(mcfg.path).expanduser()
    if p.exists():
        return p
    try:  # a hub id: its resolved snapshot folder, never the network
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(mcfg.path, revision=mcfg.revision, local_files_only=True))
    except Exception:
        raise ConfigError(
            f"model.path {mcfg.path!r} is neither a folder nor in the local hub cache, so data.cache_dir "
            "cannot be checked against its weights; download it first (`diffalign cache` online does)"
        ) from None


def model_files(mcfg: ModelConfig) -> dict[str, list[tuple[str, Path]]]:
    """``{component: [(name inside the model folder, path), ...]}`` for the components that make
    the cache (``pipeline`` is the top-level files)."""
    root = _model_root(mcfg)
    index = json.loads((root / "model_index.json").read_text())
    out = {"pipeline": [(n, root / n) for n in PIPELINE_FILES if (root / n).is_file()]}
    for c in CACHE_COMPONENTS:
        entry = index.get(c)
        if isinstance(entry, list) and entry and entry[0] is not None and (root / c).is_dir():
            files = (f for f in (root / c).rglob("*") if f.is_file())
            out[c] = sorted((f.relative_to(root).as_posix(), f) for f in files)
    return out


def _identity(ds: Any, mcfg: ModelConfig) -> dict[str, Any]:
    files = source_files(ds)
    total = sum(f.stat().st_size for f in files if f.is_file())
    print(f"cache: hashing {len(files)} data files ({total / 2**20:.1f} MiB) to record what it is built from")
    return {
        "data_files": [_record(f) for f in files],
        "model": {c: [[n, *_record(f)] for n, f in fs] for c, fs in model_files(mcfg).items()},
    }


def _settings(dcfg: DataConfig, mcfg: ModelConfig, ds: Any, has_t5: bool) -> dict[str, Any]:
    """The index keys a cache must match besides its files (order: the first mismatch is reported)."""
    return {
        "resolution": dcfg.resolution,
        "format": _kind(dcfg),
        "data_fingerprint": data_fingerprint(ds),
        "num_rows": len(ds),
        "k": ds.k,
        "center_crop": True,  # _check_cacheable: no random crop, no flip
        "max_sequence_length": mcfg.max_sequence_length if has_t5 else None,  # SD3's T5 prompt length
    }


def _read_index(root: Path) -> dict[str, Any]:
    try:
        index = json.loads((root / "index.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"data.cache_dir {str(root)!r}: index.json is not valid JSON; {FIX}") from None
    if not isinstance(index, dict) or index.get("version") != VERSION:
        raise ConfigError(
            f"data.cache_dir {str(root)!r} was written by an older diffalign and records neither the content "
            f"of its data files nor the model weights it was made with, so it cannot be checked; {FIX}"
        )
    return index


def check_identity(index: dict[str, Any], root: Path, dcfg: DataConfig, mcfg: ModelConfig, ds: Any) -> None:
    """Refuse, in one line naming what changed, a cache built from other data, settings or weights."""
    where = f"data.cache_dir {str(root)!r}"
    files = model_files(mcfg)
    for k, v in _settings(dcfg, mcfg, ds, "text_encoder_3" in files).items():
        if index.get(k) != v:
            raise ConfigError(f"{where} is stale: {k} is {index.get(k)!r} there, {v!r} now; {FIX}")
    _check_data_files(index["data_files"], source_files(ds), where, dcfg.path)
    for comp in sorted(set(index["model"]) | set(files)):
        _check_component(comp, index["model"].get(comp), files.get(comp), where, mcfg.path)


def _check_data_files(old: list[list[Any]], now: list[Path], where: str, data_path: str) -> None:
    if len(old) != len(now):
        extra = f"{now[len(old)]} is new" if len(now) > len(old) else f"{old[len(now)][0]} is not among them"
        raise ConfigError(
            f"{where} was built from {len(old)} data files; data.path {data_path!r} now gives "
            f"{len(now)} ({extra}); {FIX}"
        )
    for rec, path in zip(old, now, strict=True):
        size, sha = _now(rec, path)
        if sha == rec[3]:
            continue
        was = f"{where} was built from data file {rec[0]} of {rec[1]} bytes (sha256 {rec[3][:12]})"
        is_now = "missing" if size < 0 else f"{size} bytes" + (f", sha256 {sha[:12]}" if sha else "")
        if str(path.resolve()) == rec[0]:
            raise ConfigError(f"{was}, which now has other content ({is_now}); {FIX}")
        raise ConfigError(f"{was}; data.path now gives {path} there, with other content ({is_now}); {FIX}")


def _digest(entries: list[tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{n}:{s}\n" for n, s in entries).encode()).hexdigest()[:12]


def _check_component(
    comp: str, old: list[list[Any]] | None, now: list[tuple[str, Path]] | None, where: str, model: str
) -> None:
    if old is None or now is None:
        had, has = ("without", "one") if old is None else ("with", "none")
        raise ConfigError(f"{where} was built {had} a {comp}, model.path {model!r} now has {has}; {FIX}")
    old_by_name = {rec[0]: rec for rec in old}  # rec: [name, path, size, mtime_ns, sha256]
    old_shas = {n: rec[4] for n, rec in old_by_name.items()}
    new_shas = {
        n: _now(old_by_name[n][1:], path)[1] if n in old_by_name else sha256_file(path) for n, path in now
    }
    if new_shas == old_shas:
        return
    changed = [n for n in sorted(old_shas.keys() | new_shas.keys()) if old_shas.get(n) != new_shas.get(n)]
    weights = [n for n in changed if n.endswith(WEIGHT_SUFFIXES)]
    # a weight file changed: say "weights" and name it; else a config or tokenizer file changed
    what, first = ("weights", weights[0]) if weights else ("files", changed[0])
    how = "is gone" if first not in new_shas else "is new" if first not in old_shas else "changed"
    # a size change leaves the new sha unread (None); hash it now for the message
    new = [(n, s or sha256_file(dict(now)[n])) for n, s in sorted(new_shas.items())]
    raise ConfigError(
        f"{where} was built with {comp} {what} {_digest(sorted(old_shas.items()))}, model.path {model!r} "
        f"now has {_digest(new)} ({first} {how}); {FIX}"
    )


# ----------------------------------------------------------------------------- build


def _encode_shard(adapter: Any, ds: Any, idx: range, device: str, ranked: bool) -> dict[str, torch.Tensor]:
    lat, cond, micro, skipped, extra = [], [], [], [], []
    for chunk in (list(idx)[i : i + 16] for i in range(0, len(idx), 16)):
        items = [ds[(i, 0)] for i in chunk]
        pix = torch.stack([it["pixels"] for it in items])  # [b,k,3,R,R]
        # the VAE sees the b*k images as one batch, then they are regrouped per row: [b,k,C,h,w]
        lat.append(adapter.encode_chunked(pix.flatten(0, 1).to(device)).unflatten(0, pix.shape[:2]).cpu())
        cond.append({k: v.cpu() for k, v in adapter.encode_prompts([it["caption"] for it in items]).items()})
        micro.append(torch.stack([it["micro"] for it in items]))
        skipped.append(torch.tensor([it["skipped"] for it in items]))
        if ranked:
            extra.append({n: torch.stack([it[n] for it in items]) for n in ("phi", "rank")})
    tensors = {"latents": torch.cat(lat), "micro": torch.cat(micro), "skipped": torch.cat(skipped)}
    for n in ("phi", "rank") if ranked else ():
        tensors[n] = torch.cat([e[n] for e in extra])
    for k in cond[0]:
        tensors[f"cond.{k}"] = torch.cat([c[k] for c in cond])
    return {k: v.contiguous() for k, v in tensors.items()}


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _refuse_orphans(out: Path) -> None:
    """The index is written before any shard, so shards (or an uncond embedding) without one were left
    by another build whose index was deleted: their data and weights are unknown, and resuming would
    file them under this build's identity."""
    files = (*out.glob("shard-*.safetensors"), out / "uncond.safetensors")
    left = sorted(p.name for p in files if p.exists())
    if left:
        raise ConfigError(
            f"data.cache_dir {str(out)!r} holds shards without an index ({left[0]}"
            f"{f' and {len(left) - 1} more' if len(left) > 1 else ''}); empty the folder or choose another "
            f"data.cache_dir"
        )


class CacheTooLarge(ConfigError):
    """The cache would take more disk than it may (``build_cache(max_bytes=...)``)."""


def build_cache(cfg: Config, shard_size: int = 256, max_bytes: int | None = None) -> Path:
    """Write ``cfg.data.cache_dir`` (resumes a killed build). ``max_bytes``: after the first shard
    written, project the whole cache's size from it and raise ``CacheTooLarge`` if it exceeds this."""
    from tqdm.auto import tqdm

    from .._quiet import quiet_libraries
    from ..models.loading import default_device, load_adapter

    quiet_libraries()
    if not cfg.data.cache_dir:
        raise ConfigError(
            "data.cache_dir is not set: say where to write the cache (data.cache_dir=PATH, or auto)"
        )
    if cfg.data.cache_dir == AUTO:  # the folder `diffalign train` with data.cache_dir=auto reads
        cfg = replace(cfg, data=replace(cfg.data, cache_dir=str(auto_dir(cfg.data, cfg.model))))
    _check_cacheable(cfg.data)
    out = Path(cfg.data.cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    dcfg = replace(cfg.data, caption_dropout=0.0, cache_dir=None)
    ds = images_dataset(dcfg)
    ranked = _kind(cfg.data) == "ranked"
    index: dict[str, Any] | None = None
    if (out / "index.json").exists():  # a rerun: resume only a cache of the same data, settings, weights
        index = _read_index(out)
        check_identity(index, out, cfg.data, cfg.model, ds)
        if index["shard_size"] != shard_size:
            raise ConfigError(
                f"data.cache_dir {str(out)!r} holds shards of {index['shard_size']} rows, this run writes "
                f"{shard_size}; {FIX}"
            )
    else:  # a fresh build: shards left without their index are of unknown data, never resumed
        _refuse_orphans(out)
    device = default_device()
    adapter = load_adapter(cfg.model, device)
    if index is None:
        identity = _identity(ds, cfg.model)  # after loading: a hub model is in the local cache now
        index = {
            "version": VERSION,
            **_settings(cfg.data, cfg.model, ds, "text_encoder_3" in identity["model"]),
            "shard_size": shard_size,
            "model_path": cfg.model.path,  # recorded for people; the check compares the files
            "family": adapter.family,
            **identity,
        }
        write_atomic(out / "index.json", json.dumps(index, indent=1))
    if not (out / "uncond.safetensors").exists():
        uncond = {k: v.cpu().contiguous() for k, v in adapter.encode_prompts([""]).items()}
        _save_atomic(uncond, out / "uncond.safetensors")
    n_shards = (len(ds) + shard_size - 1) // shard_size
    for s in tqdm(range(n_shards), desc="cache", unit="shard"):
        path = out / SHARD.format(s)
        if path.exists():
            continue  # resumed
        idx = range(s * shard_size, min(len(ds), (s + 1) * shard_size))
        _save_atomic(_encode_shard(adapter, ds, idx, device, ranked), path)
        if max_bytes is not None:
            projected = path.stat().st_size / len(idx) * len(ds)  # text embeddings dominate (SD3: ~5 MB/row)
            if projected > max_bytes:
                raise CacheTooLarge(
                    f"data.cache_dir {str(out)!r}: {len(ds)} rows would take ~{projected / 2**30:.1f} GiB "
                    f"(more than the {max_bytes / 2**30:.1f} GiB allowed)"
                )
            max_bytes = None  # checked once
    print(f"cached {len(ds)} {'ranked groups' if ranked else 'pairs'} in {n_shards} shards at {out}")
    return out


class CachedPairs(torch.utils.data.Dataset):
    """Reads a cache built by ``build_cache``; items mirror ``PairDataset`` (or ``RankedDataset``) with
    latents instead of pixels. Refuses a cache of other data, settings or weights (see the module doc)."""

    def __init__(self, dcfg: DataConfig, mcfg: ModelConfig, src: Any = None) -> None:
        """``src``: the uncached dataset of ``dcfg`` when the caller has read it already."""
        _check_cacheable(dcfg)
        root = Path(dcfg.cache_dir or "")
        if not (root / "index.json").exists():
            raise ConfigError(
                f"data.cache_dir {str(root)!r} has no index.json: run `diffalign cache CONFIG` first"
            )
        self.index = _read_index(root)
        if src is None:  # light columns only: no image decoding
            src = images_dataset(replace(dcfg, cache_dir=None), verbose=False)
        check_identity(self.index, root, dcfg, mcfg, src)
        self.k = self.index["k"]
        n_shards = (len(src) + self.index["shard_size"] - 1) // self.index["shard_size"]
        missing = [s for s in range(n_shards) if not (root / SHARD.format(s)).exists()]
        if missing or not (root / "uncond.safetensors").exists():
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


# ----------------------------------------------------------------------------- data.cache_dir: auto

AUTO = "auto"


def cache_home() -> Path:
    """Where ``data.cache_dir: auto`` keeps its caches: ``$DIFFALIGN_CACHE_HOME``, else
    ``~/.cache/diffalign``."""
    return Path(os.environ.get("DIFFALIGN_CACHE_HOME") or Path.home() / ".cache" / "diffalign")


def auto_dir(dcfg: DataConfig, mcfg: ModelConfig) -> Path:
    """The auto cache's folder for this data and model: keyed by where they are and the settings that
    shape the cache. The content is checked by the index as for any cache (a changed file is caught
    there and the folder rebuilt), so the key only has to separate unrelated caches."""
    model, data = Path(mcfg.path).expanduser(), Path(dcfg.path).expanduser()
    key = {
        "model": str(model.resolve()) if model.exists() else f"{mcfg.path}@{mcfg.revision}",
        "data": str(data.resolve()) if data.exists() else dcfg.path,  # a local path, or a hub id
        "format": dcfg.format,
        "split": dcfg.split,
        "resolution": dcfg.resolution,
        "max_pairs": dcfg.max_pairs,
        "drop_ties": dcfg.drop_ties,
        "max_sequence_length": mcfg.max_sequence_length,
        "version": VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_home() / "latents" / digest


def _return_memory() -> None:
    """Free the build's pipeline and hand the freed heap back to the OS (glibc keeps freed small
    blocks otherwise, and the training pipeline loaded next would add to the process's peak)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _open(dcfg: DataConfig, mcfg: ModelConfig, src: Any) -> tuple[CachedPairs | None, str]:
    """The complete cache of this data and model at ``dcfg.cache_dir``, or None and why not."""
    if not (Path(dcfg.cache_dir or "") / "index.json").exists():
        return None, "not built"
    try:
        return CachedPairs(dcfg, mcfg, src), ""
    except ConfigError as e:
        return None, str(e)


def auto_cache(
    cfg: Config, ds: Any, rows_read: int, objective_needs: str, main: bool, barrier: Callable[[], None]
) -> tuple[CachedPairs | None, str]:
    """Resolve ``data.cache_dir: auto`` for the uncached dataset ``ds``: ``(cache, what happened)``
    when training reads a cache, ``(None, why not)`` when it encodes images as it goes. Called by
    every process of a launch (the main process builds, the others wait at ``barrier``); the same
    answer everywhere.

    The cache is reused whenever a complete one of this data and model exists (any earlier run, epoch
    or sweep over the same data); it is built at start-up only when the run reads every row at least
    once (``rows_read >= len(ds)``), so building costs no more VAE and text-encoder work than encoding
    as it goes would, and only when it takes at most half the free disk. Never with random crops or
    flips (a cache holds one view), nor when ``objective_needs`` names what the objective reads that a
    cache does not hold (reward scores, a caption per image). In fp32,
    cached and uncached training are identical (tested); under bf16/fp16 the cache holds fp32-encoded
    latents where the live path encodes in low precision."""
    d = cfg.data
    if not d.center_crop or d.random_flip:
        return None, "off: random crops or flips (a cache holds one view of each image)"
    if objective_needs:
        return None, f"off: the objective reads {objective_needs}, which a cache does not hold"
    dcfg = replace(d, cache_dir=str(auto_dir(d, cfg.model)))
    root = Path(dcfg.cache_dir or "")
    cached, built = None, ""
    if main:
        cached, _ = _open(dcfg, cfg.model, ds)
    if main and cached is None:
        if rows_read < len(ds):
            built = (
                f"off: this run reads {rows_read} of the data's {len(ds)} rows, and building a cache reads "
                "all; `diffalign cache CONFIG data.cache_dir=auto` builds it for later runs"
            )
        else:
            t0 = time.perf_counter()
            try:
                root.mkdir(parents=True, exist_ok=True)
                free = shutil.disk_usage(root).free
                try:
                    build_cache(replace(cfg, data=dcfg), max_bytes=free // 2)
                except CacheTooLarge:
                    raise
                except ConfigError:  # built from other data or weights, or left orphaned: ours to replace
                    shutil.rmtree(root)
                    root.mkdir(parents=True)
                    build_cache(replace(cfg, data=dcfg), max_bytes=free // 2)
                built = f"built in {time.perf_counter() - t0:.0f} s"
                _return_memory()  # the build's pipeline copy, before training loads its own
            except Exception as e:  # noqa: BLE001 (a failed build leaves training correct, just uncached)
                shutil.rmtree(root, ignore_errors=True)
                built = f"off: building it failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    barrier()
    if cached is None:  # the others, and a main process that built (or failed to)
        cached, why = _open(dcfg, cfg.model, ds)
        if cached is None:
            return None, built or f"off: {why}"
    return cached, f"{root} ({built or 'reused'})"
