"""``diffalign eval`` judging and reward scoring of a GenEval image folder, cached per image.

Judgements (``judged.jsonl``) and reward scores (``rewards.jsonl``) are appended per image with the
image's SHA-1, so a rerun reuses them and re-judges only new or changed images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...synpic import image_seed
from .detectors import Detector, Thresholds
from .generation import read_image, sample_path, sha1
from .rules import judge, select_detections
from .settings import EvalConfig


def judge_image(detector: Detector, image: np.ndarray, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Detect, judge by GenEval's rules; returns ``correct``, ``reason`` and ``details`` (JSON of the
    kept boxes per class, ``[x1, y1, x2, y2, score]``, as GenEval writes them)."""
    return judge_detections(detector.detect(image, metadata), metadata, detector.thresholds)


def judge_detections(dets: list, metadata: Mapping[str, Any], th: Thresholds) -> dict[str, Any]:
    ok, reason = judge(dets, metadata, position_margin=th.position, **th.rules_kwargs())
    kept = select_detections(dets, str(metadata["tag"]), **th.rules_kwargs())
    details = {cls: [[*map(float, d.box), float(d.score)] for d in ds] for cls, ds in kept.items()}
    return {"correct": bool(ok), "reason": reason, "details": json.dumps(details)}


def _cached(
    folder: Path, rows: Sequence[Mapping[str, Any]], cfg: EvalConfig, cache_file: Path, field: str, value: str
) -> tuple[
    dict[str, dict[str, Any]], list[tuple[int, int, Path]], dict[Path, str], list[tuple[int, int, Path]]
]:
    """Per-image cache records of ``cache_file`` whose ``field`` equals ``value`` (by file), every
    (prompt, sample, path) of the folder, their SHA-1s, and those with no record or a changed image."""
    cache: dict[str, dict[str, Any]] = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by an interruption
                continue
            if rec.get(field) == value:
                cache[rec["file"]] = rec
    items = [(i, k, sample_path(folder, i, k)) for i in range(len(rows)) for k in range(cfg.per_prompt)]
    shas = {p: sha1(p) for _, _, p in items}
    todo = [
        (i, k, p)
        for i, k, p in items
        if (c := cache.get(str(p.relative_to(folder)))) is None or c["sha1"] != shas[p]
    ]
    return cache, items, shas, todo


def judge_folder(
    folder: Path,
    root: Path,
    rows: Sequence[Mapping[str, Any]],
    cfg: EvalConfig,
    detector_fn,
    judge_key: str,
    log=print,
) -> list[dict[str, Any]]:
    """GenEval per-image results for a model folder; judgements cached in ``judged.jsonl``."""
    cache_file = folder / "judged.jsonl"
    cache, items, shas, todo = _cached(folder, rows, cfg, cache_file, "judge", judge_key)
    if todo:
        log(f"  judging {len(todo)} images ({len(items) - len(todo)} cached)")
        detector: Detector = detector_fn()
        step = max(1, getattr(detector, "batch_size", 8))
        with cache_file.open("a") as f:
            for s in range(0, len(todo), step):
                chunk = todo[s : s + step]
                imgs = [read_image(p) for _, _, p in chunk]
                metas = [rows[i] for i, _, _ in chunk]
                dets = detector.detect(imgs, metas)
                for (_i, _k, p), d, md in zip(chunk, dets, metas, strict=True):
                    rec = {
                        "file": str(p.relative_to(folder)),
                        "sha1": shas[p],
                        "judge": judge_key,
                        **judge_detections(d, md, detector.thresholds),
                    }
                    cache[rec["file"]] = rec
                    f.write(json.dumps(rec) + "\n")
                f.flush()
    results = []
    for i, k, p in items:
        c = cache[str(p.relative_to(folder))]
        md = rows[i]
        results.append(
            {
                "filename": str(p.relative_to(root)),
                "tag": md["tag"],
                "prompt": md["prompt"],
                "correct": c["correct"],
                "reason": c["reason"],
                "metadata": json.dumps(md),
                "details": c["details"],
                "prompt_index": i,
                "sample": k,
                "seed": image_seed(cfg.seed, i, k),
            }
        )
    with (folder / "results.jsonl.tmp").open("w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    os.replace(folder / "results.jsonl.tmp", folder / "results.jsonl")
    return results


def reward_key(spec: str, specs: Sequence[str]) -> str:
    """Display name of a reward spec: its name, plus the model folder's name if the name repeats."""
    name, _, path = spec.partition("=")
    if sum(s.partition("=")[0] == name for s in specs) > 1:
        return f"{name}({Path(path).name or path})"
    return name


def score_folder(
    folder: Path, rows: Sequence[Mapping[str, Any]], cfg: EvalConfig, spec: str, reward_fn, log=print
) -> list[list[float]]:
    """Per-prompt lists of one reward's image scores; cached in ``rewards.jsonl`` by image hash."""
    import torch

    cache_file = folder / "rewards.jsonl"
    cache, items, shas, todo = _cached(folder, rows, cfg, cache_file, "reward", spec)
    if todo:
        log(f"  scoring {len(todo)} images with {spec} ({len(items) - len(todo)} cached)")
        reward = reward_fn()
        with cache_file.open("a") as f:
            for s in range(0, len(todo), cfg.batch):
                chunk = todo[s : s + cfg.batch]
                imgs = [read_image(p) for _, _, p in chunk]
                if len({im.shape for im in imgs}) > 1:  # rewards take one batch tensor; score one by one
                    scores = [
                        float(
                            reward(
                                torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255, [rows[i]["prompt"]]
                            ).scores[0]
                        )
                        for im, (i, _, _) in zip(imgs, chunk)
                    ]
                else:
                    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
                    scores = reward(x, [rows[i]["prompt"] for i, _, _ in chunk]).scores.tolist()
                for (_i, _k, p), sc in zip(chunk, scores, strict=True):
                    rec = {
                        "file": str(p.relative_to(folder)),
                        "sha1": shas[p],
                        "reward": spec,
                        "score": float(sc),
                    }
                    cache[rec["file"]] = rec
                    f.write(json.dumps(rec) + "\n")
                f.flush()
    out: list[list[float]] = [[] for _ in rows]
    for i, _k, p in items:
        out[i].append(cache[str(p.relative_to(folder))]["score"])
    return out
