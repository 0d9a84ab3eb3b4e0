"""Syn-Pic: generate, score and rank a synthetic preference dataset (RankDPO's recipe).

prompts x generators x k images per generator (k may differ per generator) -> reward ensemble ->
vote phi and rank per prompt.

Output folder::

    manifest.json          generators (and a fingerprint of their weight files), rewards, sampler
                           settings, seed, versions, shard layout
    shard-00000.parquet    one row per prompt: prompt, images (PNG/JPEG bytes), generator, seed,
                           scores.<reward>, phi, rank   (lists of length K = sum of the k's)

Every image's seed is derived from (seed, prompt index, generator index, image index), so any
shard can be regenerated identically. Shards are written to a temporary file and renamed: a
shard on disk is always complete, and a rerun after a crash continues at the first missing
shard without duplicating or losing prompts; it refuses to continue if a local generator's weight
files changed since the run started (the images already on disk would come from other weights).
Processes started with ``accelerate launch`` (or
any launcher setting RANK/WORLD_SIZE) take shards round-robin; whichever process finds every
shard present writes ``index.json`` (the merge: shard list, row counts, SHA-256 of each shard),
the marker that the dataset is complete. ``merge_shards`` rebuilds it by hand.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from .errors import ConfigError


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
    import hashlib

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
    import hashlib

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


def run_synpic(cfg: SynPicConfig, rank: int | None = None, world: int | None = None, writer=None) -> Path:  # noqa: C901 (the dataset build loop, read top to bottom)
    """Build (or continue) the ranked dataset; returns the output folder."""
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
        old = json.loads(mf.read_text())
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
        tmp = mf.with_name("manifest.json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2))
        os.replace(tmp, mf)
    todo = [
        s
        for s in range(manifest["num_shards"])
        if s % world == rank and not (out / f"shard-{s:05d}.parquet").exists()
    ]
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
        _write_shard(out / f"shard-{s:05d}.parquet", rows, writer)
    bar.close()
    merge_shards(out, require_complete=False)
    return out


def merge_shards(out: str | Path, require_complete: bool = True) -> Path | None:
    """Check that every shard named by the manifest is on disk and readable, then write
    ``index.json`` atomically. Returns its path, or None when shards are still missing (other
    ranks still working) and ``require_complete`` is False."""
    import hashlib

    import pyarrow.parquet as pq

    out = Path(out)
    mf = out / "manifest.json"
    if not mf.exists():
        raise ConfigError(f"{out} is not a Syn-Pic folder (no manifest.json)")
    n = json.loads(mf.read_text())["num_shards"]
    names = [f"shard-{s:05d}.parquet" for s in range(n)]
    missing = [x for x in names if not (out / x).exists()]
    if missing:
        if require_complete:
            raise ConfigError(
                f"{out}: {len(missing)} of {n} shards missing (first: {missing[0]}); rerun synpic to finish"
            )
        return None
    shards = []
    for x in names:
        data = (out / x).read_bytes()
        shards.append(
            {
                "file": x,
                "rows": pq.ParquetFile(io.BytesIO(data)).metadata.num_rows,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
    index = {"num_rows": sum(s["rows"] for s in shards), "shards": shards}
    tmp = out / f"index.json.{os.getpid()}.tmp"  # per-process name: two ranks may finish together
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / "index.json")
    for stale in out.glob("index.json.*.tmp"):  # left by a process killed mid-write (not a live one's)
        try:
            os.kill(int(stale.name.split(".")[2]), 0)
        except (ValueError, ProcessLookupError):
            stale.unlink(missing_ok=True)
        except PermissionError:
            pass
    return out / "index.json"


def _write_shard(path: Path, rows: dict[str, list], writer=None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    try:
        (writer or pq.write_table)(pa.table(rows), tmp)
        os.replace(tmp, path)  # the commit point: a shard named *.parquet is complete
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"writing {path.name} failed ({e.strerror or e}); nothing was left half-written"
        ) from None


PairsMode = Literal["best_worst", "all"]
PAIRS_MODES: tuple[str, ...] = get_args(PairsMode)


def check_pairs_mode(mode: str, n: int) -> None:
    """Fail in one line on export-pairs settings that make no sense (before any work is done)."""
    if mode not in PAIRS_MODES:
        raise ConfigError(f"pairs mode {mode!r}; valid choices: {', '.join(PAIRS_MODES)}")
    if n < 1 or (mode == "all" and n != 1):
        raise ConfigError(f"n={n}: the n best vs the n worst needs n >= 1 and mode best_worst")


def export_pairs(ranked: str | Path, out: str | Path, mode: PairsMode = "best_worst", n: int = 1) -> Path:
    """Ranked shards -> one Pick-a-Pic style parquet (caption, jpg_0, jpg_1, label_0, label_1, plus
    ``score_0.<reward>``/``score_1.<reward>`` for every reward, e.g. for SmPO's ``data.score_column``).
    ``best_worst``: each of the ``n`` best against each of the ``n`` worst per prompt (``n`` = 1: rank 1
    vs rank k); ``all``: every pair with different phi. Pairs far apart in the ranking are labelled
    more reliably by an imperfect reward than neighbours are, so ``n`` trades pairs for label noise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    check_pairs_mode(mode, n)

    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    short = 0
    for f in sorted(Path(ranked).glob("shard-*.parquet")):
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
    pq.write_table(pa.table(rows), out)
    return out
