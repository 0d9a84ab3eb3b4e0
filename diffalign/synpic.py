"""Syn-Pic: generate, score and rank a synthetic preference dataset (RankDPO's recipe).

prompts x generators x k images per generator (k may differ per generator) -> reward ensemble ->
vote phi and rank per prompt.

Output folder::

    manifest.json               generators (and a fingerprint of their weight files), rewards, sampler
                                settings, seed, versions, shard layout
    shard-00000.parquet         one row per prompt: prompt, images (PNG/JPEG bytes), generator, seed,
                                scores.<reward>, phi, rank   (lists of length K = sum of the k's)
    shard-00000.parquet.json    the shard's checksum: file, rows, bytes, sha256
    index.json                  written last, only when every shard verifies: the verified checksums

Every image's seed is derived from (seed, prompt index, generator index, image index), so any
shard can be regenerated identically. It refuses to continue if a local generator's weight
files changed since the run started (the images already on disk would come from other weights).

Integrity (crash-safe without locks or fsync). A shard is written as ``shard-N.parquet.tmp``; its
SHA-256, size and row count are computed from the bytes on disk and written to the sidecar
``shard-N.parquet.json`` (itself via a temporary file and a rename); only then is the shard renamed
into place. So a shard visible under its name always has its checksum beside it, and a crash at
any point leaves one of: nothing, a ``.tmp`` (ignored, overwritten), a sidecar without its shard
(the shard is missing: generated), or both. Whatever else can happen to a file afterwards (flipped
bytes, truncation, a lost sidecar, a rename that reached the disk before the data after a power
loss) is caught by the check every rerun makes on every shard present: a shard whose bytes do not
match its sidecar is reported on stderr (one line, counted) and regenerated; since the content is
deterministic, the new shard equals the old one byte for byte. A shard whose sidecar is lost is
checked against ``index.json`` instead when there is one (the sidecar is then restored, also for
sets written before sidecars existed), else regenerated. ``index.json`` (shard list, rows,
bytes, SHA-256 of each) is written only when every shard named by the manifest verifies; it is the
marker that the dataset is complete, and what ``export_pairs`` and training on the folder
(``data.format=ranked``) check the shards against before using them (see :func:`ranked_shards`).

Processes started with ``accelerate launch`` (or any launcher setting RANK/WORLD_SIZE) take shards
round-robin and each checks its own; whichever process finds every shard present and verified
writes ``index.json``. ``merge_shards`` rebuilds it by hand.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from .errors import ConfigError
from .files import sha256_file, write_json_atomic


@dataclass
class SynPicConfig:
    prompts: str
    """A .txt file (one prompt per line) or .jsonl (``prompt`` or ``caption`` key)."""
    generators: list[str]
    """Pipeline folders or hub ids (any supported family)."""
    rewards: list[str]
    """``name`` or ``name=path``, e.g. ``pickscore=yuvalkirstain/PickScore_v1`` (``diffalign ls rewards``)."""
    out: str
    images_per_generator: int | list[int] = 2
    """Images per prompt from each generator: one number for all, or one per generator (e.g. more
    from the policy being aligned than from a second model)."""
    steps: int = 20
    guidance: float | list[float] = 5.0
    """Classifier-free guidance scale: one for all generators, or one per generator (the same model
    may be listed twice, e.g. once guided and once at 1.0, whose images are mostly the losers)."""
    seed: int = 0
    shard_size: int = 64
    """Prompts per shard (the unit of resumption)."""
    batch_prompts: int = 16
    image_format: Literal["png", "jpeg"] = "png"
    dedup: bool = False
    """Drop repeated prompts (keeping the first) instead of refusing them."""
    reward_weights: list[float] = field(default_factory=list)
    """Votes per win under each reward, one per reward (default: 1 each); see ``rewards.ensemble``."""


def read_prompts(path: str, dedup: bool = False) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"prompts file {path!r} does not exist")
    out: list[str] = []
    seen: dict[str, int] = {}
    for ln, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            rec = json.loads(line)
            text = rec.get("prompt", rec.get("caption"))
            if not isinstance(text, str):
                raise ConfigError(f"{path} line {ln}: needs a 'prompt' (or 'caption') string")
        else:
            text = line.strip()
        if text in seen:
            if dedup:
                continue
            raise ConfigError(
                f"{path} line {ln}: duplicate prompt {text[:60]!r} (first "
                f"on line {seen[text]}); pass --dedup to drop repeats"
            )
        seen[text] = ln
        out.append(text)
    if not out:
        raise ConfigError(f"prompts file {path!r} is empty")
    return out


def image_seed(seed: int, *indices: int) -> int:
    """The seed of one image: a 32-bit word of ``SeedSequence([seed, *indices])``. The one home of
    per-image seeds: Syn-Pic uses (prompt, generator, image), the evaluations (``diffalign eval``, the
    demo, the toy benchmarks) use (prompt, sample). Every stored result depends on these values.
    (Training streams use :func:`diffalign.data.pairs.sample_seed`, 63-bit and domain-separated.)"""
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0])


def check_modalities(names: list[str], pipes: list[Any]) -> tuple[str, int | None]:
    """All generators make one kind of media (and audio at one rate): (modality, sample rate)."""
    from .models.generate import pipeline_modality, sample_rate

    kinds = {(pipeline_modality(p), sample_rate(p)) for p in pipes}
    if len(kinds) > 1:
        raise ConfigError(
            f"generators {names} make different media {sorted(kinds, key=str)}; one ranked set holds one kind"
        )
    return kinds.pop()


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output folder {str(out)!r} is not writable ({e.strerror})") from None


def manifest_for(cfg: SynPicConfig, prompts: list[str]) -> dict[str, Any]:
    import diffusers
    import transformers

    import diffalign

    return {
        "config": asdict(cfg),
        "num_prompts": len(prompts),
        "num_shards": (len(prompts) + cfg.shard_size - 1) // cfg.shard_size,
        "prompts_sha": _sha(prompts),
        "generator_weights": [weights_fingerprint(g) for g in cfg.generators],
        "versions": {
            "diffalign": diffalign.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }


def _resumable(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": {k: v for k, v in manifest["config"].items() if k not in ("prompts", "out")},
        "prompts_sha": manifest["prompts_sha"],
    }


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weights_fingerprint(path: str | Path, chunks: int = 16, chunk_bytes: int = 1 << 16) -> str:
    """A cheap fingerprint of a local model's weight files: names, sizes and ``chunks`` evenly spaced
    slices of each file (whole files under chunks*chunk_bytes). Retraining changes nearly every weight,
    so sampled slices catch it without reading gigabytes. Hub ids (not a local path) give ``""``."""

    root = Path(path)
    if not root.exists():
        return ""
    files = (
        [root]
        if root.is_file()
        else sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    )
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root) if f != root else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            if size <= chunks * chunk_bytes:
                h.update(fh.read())
                continue
            for i in range(chunks):
                fh.seek((size - chunk_bytes) * i // (chunks - 1))
                h.update(fh.read(chunk_bytes))
    return h.hexdigest()[:16]


def _sha(prompts: list[str]) -> str:

    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


def per_generator(value: Any, n_generators: int, name: str, unit: str) -> list:
    """``value`` for each generator: one value for all, or a list with one per generator."""
    vs = [value] * n_generators if isinstance(value, (int, float)) else list(value)
    if len(vs) != n_generators:
        raise ConfigError(f"{name} {value}: give one {unit}, or one per generator ({n_generators})")
    return vs


def per_generator_counts(images_per_generator: int | list[int], n_generators: int) -> list[int]:
    """Images per prompt for each generator; at least 1 each and 2 in all (a ranking needs two)."""
    ks = per_generator(images_per_generator, n_generators, "images_per_generator", "number")
    if min(ks) < 1:
        raise ConfigError(
            f"images_per_generator {images_per_generator}: every generator needs at least 1 image per prompt"
        )
    if sum(ks) < 2:
        raise ConfigError(
            "synpic needs at least 2 images per prompt to rank (generators x images_per_generator)"
        )
    return ks


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _shown(v: Any) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, list | tuple) else str(v)


def check_options(cfg: SynPicConfig) -> None:
    """Fail in one line naming the option on numbers no run can use, before anything is read or loaded."""
    ks = (
        cfg.images_per_generator if isinstance(cfg.images_per_generator, list) else [cfg.images_per_generator]
    )
    if not ks or not all(_is_int(k) and k >= 1 for k in ks):
        raise ConfigError(
            f"--images-per-generator {_shown(cfg.images_per_generator)}: every generator needs at least "
            "1 image per prompt (a whole number >= 1)"
        )
    for flag, v in (
        ("--steps", cfg.steps),
        ("--shard-size", cfg.shard_size),
        ("--batch-prompts", cfg.batch_prompts),
    ):
        if not (_is_int(v) and v >= 1):
            raise ConfigError(f"{flag} {v}: must be a whole number >= 1")
    if not (_is_int(cfg.seed) and cfg.seed >= 0):
        raise ConfigError(f"--seed {cfg.seed}: must be a whole number >= 0")
    gs = cfg.guidance if isinstance(cfg.guidance, list) else [cfg.guidance]
    if not gs or not all(_is_number(g) and g >= 0 for g in gs):
        raise ConfigError(f"--guidance {_shown(cfg.guidance)}: every scale must be a finite number >= 0")
    if not all(_is_number(w) and w >= 0 for w in cfg.reward_weights):
        raise ConfigError(
            f"--reward-weight {_shown(cfg.reward_weights)}: every weight must be a finite number >= 0"
        )


def run_synpic(cfg: SynPicConfig, rank: int | None = None, world: int | None = None, writer=None) -> Path:  # noqa: C901 (the dataset build loop, read top to bottom)
    """Build (or continue) the ranked dataset; returns the output folder."""
    check_options(cfg)  # before any import or load: a bad number fails in a second

    from tqdm.auto import tqdm

    from ._quiet import quiet_libraries
    from .data.media import encode_media, to_reward_input
    from .models.generate import generate_media
    from .models.loading import default_device, load_pipeline
    from .rewards import load_rewards, score_media
    from .rewards.ensemble import check_vote_weights, ranks_from_phi, vote_phi

    quiet_libraries()
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
    prompts = read_prompts(cfg.prompts, cfg.dedup)
    if not cfg.generators or not cfg.rewards:
        raise ConfigError("synpic needs at least one generator and one reward")
    try:
        check_vote_weights(cfg.reward_weights, len(cfg.rewards))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ks = per_generator_counts(cfg.images_per_generator, len(cfg.generators))
    gs = per_generator(cfg.guidance, len(cfg.generators), "guidance", "scale")
    out = Path(cfg.out)
    _check_writable(out)
    manifest = manifest_for(cfg, prompts)
    mf = out / "manifest.json"
    if mf.exists():
        old = _read_json(mf)
        if not isinstance(old, dict) or "config" not in old or "prompts_sha" not in old:
            raise ConfigError(
                f"{mf} is unreadable, so the shards beside it cannot be matched to these settings; "
                "choose another --out"
            )
        # where the prompt file and the run folder live does not matter (a moved or copied folder resumes);
        # the prompts' content (prompts_sha) and every other setting do
        if _resumable(old) != _resumable(manifest):
            raise ConfigError(
                f"{out} holds a Syn-Pic run with other settings or prompts; choose another --out"
            )
        for g, was, now in zip(
            cfg.generators, old.get("generator_weights", []), manifest["generator_weights"]
        ):
            if was != now:
                raise ConfigError(
                    f"{out}: generator {g!r} has other weights than when this "
                    f"Syn-Pic run started (fingerprint {was} -> {now}); its "
                    "images on disk would mix two models; choose another --out"
                )
    elif rank == 0:
        write_json_atomic(mf, manifest)
    todo = _shards_to_make(
        out, [s for s in range(manifest["num_shards"]) if s % world == rank], _expected_rows(manifest)
    )
    if not todo:
        merge_shards(out, require_complete=False)
        return out
    device = default_device()
    loaded = {
        g: load_pipeline(g, device) for g in dict.fromkeys(cfg.generators)
    }  # a model listed twice loads once
    pipes = [loaded[g] for g in cfg.generators]
    modality, sr = check_modalities(cfg.generators, [p for p, _ in pipes])
    rewards = load_rewards(cfg.rewards, device, modality)
    K = sum(ks)
    first = [sum(ks[:gi]) for gi in range(len(ks))]  # column of each generator's first image in a row
    owner = [gi for gi, k in enumerate(ks) for _ in range(k)]  # generator of each column
    total = sum(min(cfg.shard_size, len(prompts) - s * cfg.shard_size) for s in todo) * K
    bar = tqdm(total=total, desc="synpic", unit="img")
    t0 = time.time()
    for s in todo:
        idx = list(range(s * cfg.shard_size, min(len(prompts), (s + 1) * cfg.shard_size)))
        images: list[list[Any]] = [[None] * K for _ in idx]  # per prompt: K images, generator-major
        seeds = [[0] * K for _ in idx]
        for gi, (pipe, call_kw) in enumerate(pipes):
            k = ks[gi]
            for b in range(0, len(idx), cfg.batch_prompts):
                chunk = idx[b : b + cfg.batch_prompts]
                gseeds = [image_seed(cfg.seed, p, gi, j) for p in chunk for j in range(k)]
                outs = generate_media(
                    pipe, [prompts[p] for p in chunk], k, gseeds, cfg.steps, gs[gi], **call_kw
                )
                for ci in range(len(chunk)):
                    for j in range(k):
                        images[b + ci][first[gi] + j] = outs[ci * k + j]
                        seeds[b + ci][first[gi] + j] = gseeds[ci * k + j]
                bar.update(len(chunk) * k)
                bar.set_postfix(img_per_s=f"{bar.n / (time.time() - t0):.1f}")
        flat = to_reward_input([im for row in images for im in row], modality)
        flat_prompts = [prompts[p] for p in idx for _ in range(K)]
        scores = {
            name: score_media(r, flat, flat_prompts, sr).view(len(idx), K) for name, r in rewards.items()
        }
        phi = vote_phi(scores, cfg.reward_weights)
        ranks = ranks_from_phi(phi)
        rows: dict[str, list] = {
            "prompt": [prompts[p] for p in idx],
            "prompt_index": idx,
            "images": [[encode_media(im, modality, cfg.image_format, sr) for im in row] for row in images],
            "generator": [[cfg.generators[owner[j]] for j in range(K)] for _ in idx],
            "seed": seeds,
            "phi": phi.tolist(),
            "rank": ranks.tolist(),
        }
        for name, sc in scores.items():
            rows[f"scores.{name}"] = sc.tolist()
        write_shard(out / shard_name(s), rows, writer)
    bar.close()
    merge_shards(out, require_complete=False)
    return out


# ----------------------------------------------------------------------------- integrity


def shard_name(s: int) -> str:
    return f"shard-{s:05d}.parquet"


def sidecar_path(shard: Path) -> Path:
    """The checksum file beside a shard: ``shard-00000.parquet.json``."""
    return shard.with_name(shard.name + ".json")


def _read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing, unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return None


def _checksum(obj: Any, name: str | None) -> dict[str, Any] | None:
    """A well-formed checksum record (file, rows, bytes, sha256) for shard ``name``, else None. Indexes
    written before shards had sidecars have no ``bytes``: None there (the SHA-256 still decides)."""
    if not isinstance(obj, dict) or obj.get("file") != name:
        return None
    sha, size = obj.get("sha256"), obj.get("bytes")
    if not (isinstance(sha, str) and len(sha) == 64 and _is_int(obj.get("rows"))):
        return None
    if size is not None and not _is_int(size):
        return None
    return {"file": name, "rows": obj["rows"], "bytes": size, "sha256": sha}


def _index_entries(folder: Path) -> dict[str, dict[str, Any]] | None:
    """``index.json``'s checksum records by shard name; None when it is missing or malformed."""
    index = _read_json(folder / "index.json")
    if not (isinstance(index, dict) and isinstance(index.get("shards"), list)):
        return None
    parsed = [_checksum(e, e.get("file") if isinstance(e, dict) else None) for e in index["shards"]]
    return {e["file"]: e for e in parsed if e is not None} if all(parsed) else None


def read_sidecar(shard: Path) -> dict[str, Any] | None:
    return _checksum(_read_json(sidecar_path(shard)), shard.name)


def shard_problem(shard: Path, expected: dict[str, Any] | None, rows: int | None = None) -> str | None:
    """Why ``shard`` does not match its checksum record ``expected`` (and ``rows``, the row count the
    manifest implies, when known), in a few words; None when it verifies."""
    if not shard.exists():
        return "missing"
    if expected is None:
        return "checksum missing"
    if rows is not None and expected["rows"] != rows:
        return f"{expected['rows']} rows recorded, the manifest implies {rows}"
    try:
        size = shard.stat().st_size
        if expected["bytes"] is not None and size != expected["bytes"]:
            return (
                f"truncated ({size} of {expected['bytes']} bytes)"
                if size < expected["bytes"]
                else f"{size} bytes, {expected['bytes']} recorded"
            )
        sha = sha256_file(shard)
    except OSError as e:
        return f"unreadable ({e.strerror or type(e).__name__})"
    return None if sha == expected["sha256"] else "checksum mismatch"


def _num_shards(manifest: Any) -> int | None:
    n = manifest.get("num_shards") if isinstance(manifest, dict) else None
    return n if _is_int(n) and n >= 0 else None


def _expected_rows(manifest: Any) -> list[int | None]:
    """Rows of each shard as the manifest implies them (None each where it does not say)."""
    n = _num_shards(manifest) or 0
    total = manifest.get("num_prompts") if isinstance(manifest, dict) else None
    size = (manifest.get("config") or {}).get("shard_size") if isinstance(manifest, dict) else None
    if not (_is_int(total) and _is_int(size) and size > 0):
        return [None] * n
    return [min(size, total - s * size) for s in range(n)]


def _listed(bad: list[str], most: int = 4) -> str:
    return ", ".join(bad[:most]) + (f" and {len(bad) - most} more" if len(bad) > most else "")


def _shards_to_make(out: Path, mine: list[int], rows: list[int | None]) -> list[int]:
    """This process's shards that are missing or do not verify against their sidecar (or, where the
    sidecar is lost, against ``index.json``, which restores the sidecar). Those that do not verify
    are reported in one line on stderr and removed (with ``index.json``, now stale)."""
    todo: list[int] = []
    bad: list[str] = []
    restored = 0
    index = _index_entries(out) or {}
    for s in mine:
        path = out / shard_name(s)
        sidecar = read_sidecar(path)
        expected = sidecar or index.get(path.name)
        why = shard_problem(path, expected, rows[s])
        if why is None:
            if sidecar is None:  # verified against index.json (a lost sidecar, or a set from before sidecars)
                write_json_atomic(sidecar_path(path), {**expected, "bytes": path.stat().st_size})
                restored += 1
            continue
        todo.append(s)
        if why != "missing":
            bad.append(f"{path.name}: {why}")
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # the regenerated shard replaces it
    if restored:
        print(
            f"synpic: restored the checksum sidecar of {restored} shard(s) from index.json", file=sys.stderr
        )
    if bad:
        print(
            f"synpic: {len(bad)} shard(s) in {out} do not verify and are regenerated: {_listed(bad)}",
            file=sys.stderr,
        )
        try:
            (out / "index.json").unlink(missing_ok=True)
        except OSError:
            pass
    return todo


def merge_shards(out: str | Path, require_complete: bool = True) -> Path | None:
    """Verify every shard named by the manifest against its sidecar checksum (``index.json``'s where
    the sidecar is lost), then write ``index.json`` (the verified checksums) atomically. Returns its
    path, or None when shards are still missing (other ranks still working) or do not verify
    (reported on stderr) and ``require_complete`` is False; with ``require_complete`` both are a
    one-line error."""
    out = Path(out)
    mf = out / "manifest.json"
    if not mf.exists():
        raise ConfigError(f"{out} is not a Syn-Pic folder (no manifest.json)")
    manifest = _read_json(mf)
    n = _num_shards(manifest)
    if n is None:
        raise ConfigError(f"{mf} is unreadable or has no num_shards; rerun synpic with a new --out")
    rows = _expected_rows(manifest)
    names = [shard_name(s) for s in range(n)]
    missing = [x for x in names if not (out / x).exists()]
    if missing:
        if require_complete:
            raise ConfigError(
                f"{out}: {len(missing)} of {n} shards missing (first: {missing[0]}); rerun synpic to finish"
            )
        return None
    shards, bad = [], []
    index = _index_entries(out) or {}  # where a sidecar is lost (another rank restores it)
    for s, x in enumerate(names):
        entry = read_sidecar(out / x) or index.get(x)
        why = shard_problem(out / x, entry, rows[s])
        if why is None:
            shards.append({**entry, "bytes": (out / x).stat().st_size})
        else:
            bad.append(f"{x}: {why}")
    if bad:
        msg = (
            f"{out}: {len(bad)} of {n} shards do not verify ({_listed(bad)}); index.json not written; "
            "rerun synpic to regenerate them"
        )
        if require_complete:
            raise ConfigError(msg)
        print(f"synpic: {msg}", file=sys.stderr)
        return None
    index = {"num_shards": n, "num_rows": sum(e["rows"] for e in shards), "shards": shards}
    # per-process temporary name: two ranks may finish together
    write_json_atomic(out / "index.json", index, tmp=out / f"index.json.{os.getpid()}.tmp")
    for stale in out.glob("index.json.*.tmp"):  # left by a process killed mid-write (not a live one's)
        try:
            os.kill(int(stale.name.split(".")[2]), 0)
        except (ValueError, ProcessLookupError):
            stale.unlink(missing_ok=True)
        except PermissionError:
            pass
    return out / "index.json"


def write_shard(path: Path, rows: dict[str, list], writer=None) -> dict[str, Any]:
    """Write one shard crash-safely (module docstring): the parquet to ``.tmp``, its checksum to the
    sidecar, then the rename that makes the shard visible. Returns the checksum record."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    try:
        table = pa.table(rows)
        (writer or pq.write_table)(table, tmp)
        entry = {
            "file": path.name,
            "rows": table.num_rows,
            "bytes": tmp.stat().st_size,
            "sha256": sha256_file(tmp),
        }
        write_json_atomic(sidecar_path(path), entry)
        os.replace(tmp, path)  # the commit point: a shard named *.parquet is complete and has its checksum
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"writing {path.name} failed ({e.strerror or e}); nothing was left half-written"
        ) from None
    return entry


def write_ranked_set(out: str | Path, shards: list[dict[str, list]]) -> Path:
    """Write ranked rows made elsewhere (one dict of columns per shard, the Syn-Pic schema) as a
    checked Syn-Pic folder: manifest, shards with their checksums, ``index.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        out / "manifest.json",
        {
            "source": "write_ranked_set",
            "num_shards": len(shards),
            "num_prompts": sum(len(r["prompt"]) for r in shards),
        },
    )
    for s, rows in enumerate(shards):
        write_shard(out / shard_name(s), rows)
    merge_shards(out)
    return out


def is_synpic_folder(path: str | Path) -> bool:
    """A folder written by Syn-Pic (or :func:`write_ranked_set`): it has a manifest, an index or shards."""
    p = Path(path).expanduser()
    return p.is_dir() and (
        (p / "manifest.json").exists() or (p / "index.json").exists() or any(p.glob("shard-*.parquet"))
    )


def _set_status(folder: Path) -> tuple[list[Path], int, str | None]:
    """(verified shards in order, shards the set should have, why the set is not complete or None)."""
    manifest = _read_json(folder / "manifest.json")
    n_manifest = _num_shards(manifest)
    entries = _index_entries(folder)
    reason = None
    if not (folder / "index.json").exists():
        reason = "no index.json: synpic has not finished"
    elif entries is None:
        reason = "index.json is unreadable or malformed"
    elif n_manifest is not None and len(entries) != n_manifest:
        reason = f"index.json lists {len(entries)} shards, manifest.json {n_manifest}"
    if n_manifest is not None:
        names = [shard_name(s) for s in range(n_manifest)]
    elif entries:
        names = list(entries)
    else:
        names = sorted(f.name for f in folder.glob("shard-*.parquet"))
    rows = _expected_rows(manifest) if n_manifest is not None else [None] * len(names)
    verified, bad = [], []
    for name, r in zip(names, rows):
        path = folder / name
        expected = entries[name] if entries and name in entries else read_sidecar(path)
        why = shard_problem(path, expected, r)
        if why is None:
            verified.append(path)
        else:
            bad.append(f"{name}: {why}")
    if bad:
        what = "do not match index.json" if reason is None else "are missing or do not verify"
        reason = (
            f"{reason + '; ' if reason else ''}{len(bad)} of {len(names)} shards {what} ({_listed(bad, 2)})"
        )
    return verified, len(names), reason


def ranked_shards(folder: str | Path, allow_incomplete: bool, override: str) -> tuple[list[Path], str | None]:
    """The shards of Syn-Pic folder ``folder`` to read: all of them when ``index.json`` is valid and
    every shard matches it; otherwise a one-line error naming the folder and the fix, or, with
    ``allow_incomplete``, the shards that verify (against the index, or their sidecars) and a note
    saying how many were left out. ``override`` tells the user how to allow it (a flag or a key)."""
    folder = Path(folder).expanduser()
    fix = f"rerun `diffalign synpic` with the same settings and --out {folder} to finish or repair it"
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such Syn-Pic folder; run `diffalign synpic --out {folder}` first")
    verified, n, reason = _set_status(folder)
    if reason is None:
        return verified, None
    if not allow_incomplete:
        raise ConfigError(
            f"{folder} is not a complete Syn-Pic set: {reason}; {fix}, or {override} "
            f"to use only the {len(verified)} verified shard(s)"
        )
    if not verified:
        raise ConfigError(f"{folder}: no shard verifies: {reason}; {fix}")
    return verified, (
        f"{folder} is incomplete: {reason}; using the {len(verified)} verified shard(s), "
        f"left out {n - len(verified)} of {n}"
    )


PairsMode = Literal["best_worst", "all"]
PAIRS_MODES: tuple[str, ...] = get_args(PairsMode)


def check_pairs_mode(mode: str, n: int) -> None:
    """Fail in one line on export-pairs settings that make no sense (before any work is done)."""
    if mode not in PAIRS_MODES:
        raise ConfigError(f"pairs mode {mode!r}; valid choices: {', '.join(PAIRS_MODES)}")
    if n < 1 or (mode == "all" and n != 1):
        raise ConfigError(f"n={n}: the n best vs the n worst needs n >= 1 and mode best_worst")


def export_pairs(
    ranked: str | Path,
    out: str | Path,
    mode: PairsMode = "best_worst",
    n: int = 1,
    allow_incomplete: bool = False,
) -> Path:
    """Ranked shards -> one Pick-a-Pic style parquet (caption, jpg_0, jpg_1, label_0, label_1, plus
    ``score_0.<reward>``/``score_1.<reward>`` for every reward, e.g. for SmPO's ``data.score_column``).
    ``best_worst``: each of the ``n`` best against each of the ``n`` worst per prompt (``n`` = 1: rank 1
    vs rank k); ``all``: every pair with different phi. Pairs far apart in the ranking are labelled
    more reliably by an imperfect reward than neighbours are, so ``n`` trades pairs for label noise.

    The folder must be a complete Syn-Pic set (``index.json`` valid, every shard matching it); with
    ``allow_incomplete`` only the shards that verify are exported and the rest are counted on stderr.
    The output appears only when complete (written to a temporary file and renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_pairs_mode(mode, n)
    files, note = ranked_shards(ranked, allow_incomplete, "pass --allow-incomplete")
    if note:
        print(f"export-pairs: {note}", file=sys.stderr)

    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    short = 0
    for f in files:
        score_cols = [c for c in pq.read_schema(f).names if c.startswith("scores.")]
        for c in score_cols:
            rows.setdefault(f"score_0.{c[7:]}", [])
            rows.setdefault(f"score_1.{c[7:]}", [])
        t = pq.read_table(f, columns=["prompt", "images", "phi", "rank", *score_cols]).to_pylist()
        for r in t:
            order = np.argsort(r["rank"], kind="stable")
            if mode == "best_worst" and 2 * n > len(order):
                short += 1  # counted and reported below; n = 1 with one sample was always a tie
                continue
            pairs = (
                [(a, b) for a in order[:n] for b in order[len(order) - n :]]
                if mode == "best_worst"
                else [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
            )
            for a, b in pairs:
                if r["phi"][a] == r["phi"][b]:
                    continue  # a tie carries no preference
                rows["caption"].append(r["prompt"])
                rows["jpg_0"].append(r["images"][a])
                rows["jpg_1"].append(r["images"][b])
                rows["label_0"].append(1.0)
                rows["label_1"].append(0.0)
                for c in score_cols:
                    rows[f"score_0.{c[7:]}"].append(r[c][a])
                    rows[f"score_1.{c[7:]}"].append(r[c][b])
    if short:
        print(
            f"export-pairs: skipped {short} prompt(s) with fewer "
            f"than {2 * n} ranked samples ({n} best vs {n} worst)",
            file=sys.stderr,
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        pq.write_table(pa.table(rows), tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
