"""``diffalign eval``: GenEval-style judged evaluation and reward win rates, resumable.

    diffalign eval --model PATH_OR_RUN [--compare PATH_OR_RUN] --out DIR
        (--metadata evaluation_metadata.jsonl | --toy {heldout,train} | --geneval-templates [N]
         | --prompts FILE [--prompts FILE ...])
        [--n-prompts N] [--per-prompt 4] [--steps N] [--guidance G] [--size PX] [--seed 0]
        [--detector shapes|mask2former|mask2former=PATH] [--color-clip PATH]
        [--reward NAME=PATH ...] [--pairing all|seed] [--batch 16] [--device cpu|cuda]

Prompt sets: a GenEval ``evaluation_metadata.jsonl`` (``--metadata``), ShapesWorld prompts
(``--toy``), a GenEval-style suite built from GenEval's templates over the COCO classes
(``--geneval-templates N``: N draws per tag, seed ``--prompt-seed``, default 43 = GenEval's file), or
plain prompt files for reward-only evaluation (``--prompts``: PartiPrompts ``.tsv``, HPSv2 benchmark
``.json``, ``.txt``, ``.jsonl``; repeatable, one category per file). ``--n-prompts`` keeps N prompts
balanced over tags (categories), in file order (for ``--toy``: draws N prompts).

Models: a diffusers pipeline folder or hub id, or a diffalign run/checkpoint folder (its trained
weights are applied). ``--model`` is A ("base"), ``--compare`` is B ("aligned"); win rates are B's.

Run folder (rerunning the same command continues; finished images are never regenerated,
judgements and reward scores are cached per image, keyed by the image's hash):

    DIR/eval.json                 settings; a rerun with other generation settings is refused
    DIR/prompts.jsonl             the prompt set (GenEval metadata format when judged)
    DIR/<model|compare>/          a GenEval image folder: 00000/metadata.jsonl, 00000/samples/00000.png, ...
    DIR/<model|compare>/results.jsonl   GenEval's per-image results (filename, tag, prompt, correct,
                                  reason, metadata, details) plus prompt_index, sample, seed
    DIR/<model|compare>/summary.json    per-tag and overall accuracy (overall = mean of tag
                                  accuracies) with bootstrap CIs over prompts within tags
    DIR/summary.json              everything: settings, per-model summaries, paired differences,
                                  reward statistics and win rates
    DIR/report/                   report.md, index.html (self-contained), metrics.json, PNGs

Images are generated with one fixed seed per (prompt, sample) (``image_seed(seed, i, k)``), so a
batch's make-up does not change them and two models see the same initial noise. Each PNG is
written to a temporary name and renamed, so an interrupted run leaves no half-written image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from .detectors import Detector, Thresholds, build_detector
from .metadata import geneval_prompts, read_metadata, read_prompts, shapes_prompts, write_metadata
from .rules import TAGS, judge, select_detections, summarize

LABELS = ("model", "compare")


@dataclass
class EvalConfig:
    model: str
    out: str
    compare: str | None = None
    metadata: str | None = None
    """GenEval ``evaluation_metadata.jsonl``."""
    toy: str | None = None
    """ShapesWorld split: 'train' or 'heldout'."""
    templates: int | None = None
    """GenEval-style suite from templates: draws per tag (GenEval: 100)."""
    prompts: list[str] = field(default_factory=list)
    """Plain prompt files (reward-only evaluation)."""
    n_prompts: int | None = None
    prompt_seed: int | None = None
    per_prompt: int = 4
    steps: int | None = None
    """Default: 20 for --toy, 50 otherwise (GenEval's generation script)."""
    guidance: float | None = None
    """Default: 4.0 for --toy, 9.0 otherwise (GenEval's generation script)."""
    size: int | None = None
    seed: int = 0
    detector: str | None = None
    """'shapes' (default for --toy), 'mask2former' or 'mask2former=PATH' (default otherwise)."""
    color_clip: str | None = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    rewards: list[str] = field(default_factory=list)
    pairing: str = "all"
    batch: int = 16
    device: str | None = None
    n_boot: int = 2000
    report: bool = True


# --------------------------------------------------------------------------- prompt sets


def take_balanced(rows: Sequence[Mapping[str, Any]], n: int | None, key: str) -> list[dict[str, Any]]:
    """N rows, round-robin over ``row[key]`` groups (in order of first appearance), file order kept."""
    if n is None or n >= len(rows):
        return [dict(r) for r in rows]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get(key)), []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for idx in groups.values():
            if depth < len(idx) and len(chosen) < n:
                chosen.append(idx[depth])
        depth += 1
    return [dict(rows[i]) for i in sorted(chosen)]


def prompt_set(cfg: EvalConfig) -> tuple[list[dict[str, Any]], bool, str]:
    """(rows, judged, description) for the configured prompt source."""
    given = [x for x in ("metadata", "toy", "templates", "prompts") if getattr(cfg, x) not in (None, [])]
    if len(given) != 1:
        raise ConfigError(
            "eval needs exactly one prompt source: --metadata, --toy, --geneval-templates or --prompts"
            + (f" (got {', '.join('--' + g for g in given)})" if given else "")
        )
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise ConfigError(f"--n-prompts must be >= 1, got {cfg.n_prompts}")
    if cfg.toy is not None:
        seed = 0 if cfg.prompt_seed is None else cfg.prompt_seed
        n = 60 if cfg.n_prompts is None else cfg.n_prompts
        return shapes_prompts(cfg.toy, n, seed), True, f"ShapesWorld {cfg.toy}, {n} prompts, seed {seed}"
    if cfg.metadata is not None:
        rows = take_balanced(read_metadata(cfg.metadata), cfg.n_prompts, "tag")
        return rows, True, f"{cfg.metadata} ({len(rows)} prompts)"
    if cfg.templates is not None:
        seed = 43 if cfg.prompt_seed is None else cfg.prompt_seed
        rows = take_balanced(geneval_prompts(cfg.templates, seed), cfg.n_prompts, "tag")
        return rows, True, f"GenEval templates, {cfg.templates} per tag, seed {seed} ({len(rows)} prompts)"
    rows = [r for f in cfg.prompts for r in read_prompts(f)]
    rows = take_balanced(rows, cfg.n_prompts, "category")
    return rows, False, f"{', '.join(cfg.prompts)} ({len(rows)} prompts)"


# --------------------------------------------------------------------------- models and images


def _run_checkpoint(p: Path) -> Path | None:
    if (p / "checkpoints" / "latest").is_file():
        return p / "checkpoints" / (p / "checkpoints" / "latest").read_text().strip()
    return p if (p / "state.json").is_file() else None


def load_model(spec: str, device: str) -> tuple[Any, dict[str, Any]]:
    """(pipeline, extra call kwargs) for a pipeline folder / hub id or a diffalign run folder."""
    from ...models.loading import load_pipeline, load_trained_pipeline, pipeline_call_defaults

    p = Path(spec).expanduser()
    if (
        p.is_dir()
        and not (p / "model_index.json").is_file()
        and ((p / "checkpoints").is_dir() or (p / "state.json").is_file())
    ):
        pipe = load_trained_pipeline(p, device)
        pipe.set_progress_bar_config(disable=True)
        ckpt = _run_checkpoint(p)
        base = json.loads((ckpt / "state.json").read_text())["model_path"] if ckpt else None
        return pipe, pipeline_call_defaults(base) if base else {}
    return load_pipeline(spec, device)


def image_seed(seed: int, prompt_index: int, sample: int) -> int:
    from ..toyworlds.evaluate import image_seed as seed_of

    return seed_of(seed, prompt_index, sample)


def sample_path(folder: Path, i: int, k: int) -> Path:
    return folder / f"{i:05d}" / "samples" / f"{k:05d}.png"


def _atomic_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def prepare_folders(folder: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """GenEval layout: ``<i>/metadata.jsonl`` (one JSON object) and ``<i>/samples/``; a folder made
    for a different prompt is an error (a rerun must describe the same prompt set)."""
    for i, row in enumerate(rows):
        d = folder / f"{i:05d}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        for stale in (d / "samples").glob(".*.tmp"):  # left by an interrupted write
            stale.unlink(missing_ok=True)
        f = d / "metadata.jsonl"
        if f.is_file():
            old = json.loads(f.read_text())
            if old != json.loads(json.dumps(dict(row))):
                raise ConfigError(
                    f"{f} was made for prompt {old.get('prompt')!r}, not {row.get('prompt')!r}: "
                    "the prompt set changed; use another --out"
                )
        else:
            tmp = f.with_name(f.name + ".tmp")
            tmp.write_text(json.dumps(dict(row)))
            os.replace(tmp, f)


def generate_missing(
    folder: Path,
    rows: Sequence[Mapping[str, Any]],
    spec: str,
    cfg: EvalConfig,
    device: str,
    steps: int,
    guidance: float,
    log=print,
) -> int:
    """Generate the images not yet on disk; returns how many were made (the model loads only if any)."""
    import torch
    from tqdm.auto import tqdm

    todo = [
        (i, k)
        for i in range(len(rows))
        for k in range(cfg.per_prompt)
        if not sample_path(folder, i, k).is_file()
    ]
    if not todo:
        return 0
    log(
        f"  generating {len(todo)} images with {spec} ({len(rows) * cfg.per_prompt - len(todo)} already done)"
    )
    pipe, call_kw = load_model(spec, device)
    if cfg.size is not None:
        call_kw = {**call_kw, "height": cfg.size, "width": cfg.size}
    made = 0
    for s in tqdm(range(0, len(todo), cfg.batch), desc="generate", unit="batch", leave=False):
        chunk = todo[s : s + cfg.batch]
        gens = [torch.Generator().manual_seed(image_seed(cfg.seed, i, k)) for i, k in chunk]
        with torch.no_grad():
            imgs = pipe(
                [rows[i]["prompt"] for i, _ in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=gens,
                output_type="np",
                **call_kw,
            ).images
        imgs = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
        for (i, k), img in zip(chunk, imgs, strict=True):
            _atomic_png(img, sample_path(folder, i, k))
            made += 1
    del pipe
    return made


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- judging


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
    shas = {p: _sha1(p) for _, _, p in items}
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
                imgs = [_read_image(p) for _, _, p in chunk]
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


def _tag_groups(results: Sequence[Mapping[str, Any]]) -> dict[str, list[np.ndarray]]:
    """tag -> list over prompts of that prompt's image correctness (bool arrays)."""
    per_prompt: dict[int, list[bool]] = {}
    tag_of: dict[int, str] = {}
    for r in results:
        per_prompt.setdefault(int(r["prompt_index"]), []).append(bool(r["correct"]))
        tag_of[int(r["prompt_index"])] = str(r["tag"])
    groups: dict[str, list[np.ndarray]] = {}
    for i in sorted(per_prompt):
        groups.setdefault(tag_of[i], []).append(np.asarray(per_prompt[i], dtype=float))
    return groups


def _ordered_tags(tags) -> list[str]:
    return [t for t in TAGS if t in tags] + sorted(t for t in tags if t not in TAGS)


def tag_bootstrap(
    results: Sequence[Mapping[str, Any]],
    n: int = 2000,
    seed: int = 0,
    other: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """95% CIs of per-tag and overall accuracy, resampling prompts within each tag (a prompt's
    images stay together). With ``other`` (same prompts and seeds), CIs of other - results."""
    ga = _tag_groups(results)
    gb = _tag_groups(other) if other is not None else None
    rng = np.random.default_rng(seed)
    tags = _ordered_tags(ga)
    boots = {t: [] for t in tags}
    overall = []
    for _ in range(n):
        accs = []
        for t in tags:
            idx = rng.integers(0, len(ga[t]), len(ga[t]))
            acc = np.concatenate([ga[t][j] for j in idx]).mean()
            if gb is not None:
                acc = np.concatenate([gb[t][j] for j in idx]).mean() - acc
            boots[t].append(acc)
            accs.append(acc)
        overall.append(np.mean(accs))

    def ci(v):
        return [float(np.quantile(v, 0.025)), float(np.quantile(v, 0.975))]

    return {"per_tag_ci95": {t: ci(boots[t]) for t in tags}, "overall_ci95": ci(overall)}


def summarize_results(
    results: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    s = summarize(results)
    s["per_tag"] = {t: s["per_tag"][t] for t in _ordered_tags(s["per_tag"])}
    s["n_per_tag"] = {t: s["n_per_tag"][t] for t in s["per_tag"]}
    s.update(tag_bootstrap(results, n_boot, seed))
    return s


def paired_difference(
    base: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per-tag and overall accuracy of ``new`` minus ``base`` with paired bootstrap CIs (prompts
    resampled within tags, the same prompts for both)."""
    if [(r["prompt_index"], r["seed"]) for r in base] != [(r["prompt_index"], r["seed"]) for r in new]:
        raise ConfigError("paired comparison needs the same prompts and seeds for both models")
    sa, sb = summarize(base), summarize(new)
    boot = tag_bootstrap(base, n_boot, seed, other=new)
    tags = _ordered_tags(sa["per_tag"])
    return {
        "overall": sb["overall"] - sa["overall"],
        "overall_ci95": boot["overall_ci95"],
        "per_tag": {t: sb["per_tag"][t] - sa["per_tag"][t] for t in tags},
        "per_tag_ci95": boot["per_tag_ci95"],
    }


# --------------------------------------------------------------------------- rewards


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
                imgs = [_read_image(p) for _, _, p in chunk]
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


# --------------------------------------------------------------------------- the run


def _settings_for(cfg: EvalConfig, spec: str, steps: int, guidance: float) -> dict[str, Any]:
    p = Path(spec).expanduser()
    path = str(p.resolve()) if p.exists() else str(spec)  # the same folder however it was written
    out = {"path": path, "steps": steps, "guidance": guidance, "size": cfg.size, "seed": cfg.seed}
    latest = p / "checkpoints" / "latest"
    if latest.is_file():  # a diffalign run: pin the checkpoint, so a run that trained further is not mixed in
        ck = p / "checkpoints" / latest.read_text().strip()
        state = ck / "state.json"
        out["checkpoint"] = ck.name
        out["checkpoint_state_sha1"] = (
            hashlib.sha1(state.read_bytes()).hexdigest() if state.exists() else None
        )
    return out


def _check_names(cfg: EvalConfig, detector_spec: str | None) -> None:
    """Unknown detector or reward names fail before anything is generated."""
    from ...rewards import REWARDS

    if detector_spec is not None and detector_spec.partition("=")[0] not in ("shapes", "mask2former"):
        raise ConfigError(f"unknown detector {detector_spec!r}; valid: shapes, mask2former, mask2former=PATH")
    for spec in cfg.rewards:
        REWARDS.get(spec.partition("=")[0])


def run_eval(cfg: EvalConfig, log=print) -> dict[str, Any]:
    """Run (or continue) an evaluation; returns the contents of ``DIR/summary.json`` (plus
    ``generated``: images made by this call per model)."""
    from ..._quiet import quiet_libraries
    from ...models.loading import default_device

    quiet_libraries()
    t0 = time.time()
    if cfg.per_prompt < 1:
        raise ConfigError(f"--per-prompt must be >= 1, got {cfg.per_prompt}")
    if cfg.pairing not in ("all", "seed"):
        raise ConfigError(f"--pairing must be 'all' or 'seed', got {cfg.pairing!r}")
    rows, judged, description = prompt_set(cfg)
    toy = cfg.toy is not None
    steps = cfg.steps if cfg.steps is not None else (20 if toy else 50)
    guidance = cfg.guidance if cfg.guidance is not None else (4.0 if toy else 9.0)
    device = default_device(cfg.device)
    detector_spec = cfg.detector or ("shapes" if toy else "mask2former")
    _check_names(cfg, detector_spec if judged else None)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    models = {"model": cfg.model, **({"compare": cfg.compare} if cfg.compare else {})}

    # settings: generation settings must match an earlier run in this folder (per model)
    manifest_file = root / "eval.json"
    manifest = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {"models": {}}
    for label, spec in models.items():
        new = _settings_for(cfg, spec, steps, guidance)
        old = manifest["models"].get(label)
        if old is not None and old != new:
            diff = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k])
            raise ConfigError(
                f"{root} holds {label} images made with other settings ({diff}); use another --out"
            )
        manifest["models"][label] = new
    manifest.update(
        {
            "prompt_set": description,
            "judged": judged,
            "per_prompt": cfg.per_prompt,
            "detector": detector_spec if judged else None,
            "rewards": list(cfg.rewards),
        }
    )
    _write_json(manifest_file, manifest)
    write_metadata(root / "prompts.jsonl", rows)
    log(f"eval: {description}; {len(models)} model(s) x {cfg.per_prompt} images per prompt -> {root}")

    generated: dict[str, int] = {}
    for label, spec in models.items():
        folder = root / label
        prepare_folders(folder, rows)
        generated[label] = generate_missing(folder, rows, spec, cfg, device, steps, guidance, log)
    t_gen = time.time()

    summaries: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    if judged:
        state: dict[str, Detector] = {}

        def detector_fn() -> Detector:
            if "d" not in state:
                state["d"] = build_detector(detector_spec, device, cfg.color_clip, cfg.thresholds)
            return state["d"]

        judge_key = json.dumps(
            {"detector": detector_spec, "color_clip": cfg.color_clip, "thresholds": cfg.thresholds.as_dict()},
            sort_keys=True,
        )
        for label in models:
            results[label] = judge_folder(root / label, root, rows, cfg, detector_fn, judge_key, log)
            summaries[label] = summarize_results(results[label], cfg.n_boot, cfg.seed)
            _write_json(root / label / "summary.json", summaries[label])
    t_judge = time.time()

    reward_scores: dict[str, dict[str, list[list[float]]]] = {}
    reward_stats: dict[str, dict[str, Any]] = {}
    for spec in cfg.rewards:
        key = reward_key(spec, cfg.rewards)
        holder: dict[str, Any] = {}

        def reward_fn(spec: str = spec, holder: dict[str, Any] = holder):
            if "r" not in holder:
                from ...rewards import load_rewards

                holder["r"] = next(iter(load_rewards([spec], device).values()))
            return holder["r"]

        reward_scores[key] = {
            label: score_folder(root / label, rows, cfg, spec, reward_fn, log) for label in models
        }
        from .winrate import score_summary

        reward_stats[key] = {
            label: score_summary(s, cfg.n_boot, cfg.seed) for label, s in reward_scores[key].items()
        }
    win_rates: dict[str, Any] = {}
    if cfg.compare and reward_scores:
        from .winrate import win_rates_by_reward

        cats = None if judged else [r.get("category", "") for r in rows]
        win_rates = win_rates_by_reward(
            reward_scores, "model", "compare", cats, pairing=cfg.pairing, n_boot=cfg.n_boot, seed=cfg.seed
        )
    t_rew = time.time()

    out: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k != "thresholds"},
            "steps": steps,
            "guidance": guidance,
            "device": device,
            "detector": detector_spec if judged else None,
            "thresholds": cfg.thresholds.as_dict(),
        },
        "prompt_set": description,
        "n_prompts": len(rows),
        "judged": judged,
        "models": {
            label: {"path": spec, **({"geneval": summaries[label]} if judged else {})}
            for label, spec in models.items()
        },
    }
    if judged and cfg.compare:
        out["difference"] = paired_difference(results["model"], results["compare"], cfg.n_boot, cfg.seed)
    if reward_stats:
        out["rewards"] = reward_stats
    if win_rates:
        out["win_rates"] = win_rates
    out["timing"] = {"generate_s": t_gen - t0, "judge_s": t_judge - t_gen, "rewards_s": t_rew - t_judge}
    _write_json(root / "summary.json", out)
    if cfg.report:
        from .report import build_report

        page = build_report(root, out, rows, results, reward_scores, cfg.per_prompt)
        log(f"report: {page}")
    out["generated"] = generated
    return out


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="GenEval-style judged eval and reward win rates of a model (vs another), resumable",
        description="GenEval-style evaluation (judged by an object detector and GenEval's rules) and reward "
        "win rates. Rerun the same command on the same --out to continue an interrupted run.",
    )
    ev.add_argument(
        "--model", required=True, help="pipeline folder, hub id, or diffalign run folder (model A, 'base')"
    )
    ev.add_argument(
        "--compare",
        default=None,
        help="second model (B, 'aligned'): before/after report, paired differences, win rates of B over A",
    )
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--metadata", help="GenEval evaluation_metadata.jsonl")
    src.add_argument(
        "--toy", choices=["heldout", "train"], help="ShapesWorld prompts (judged by the exact toy detector)"
    )
    src.add_argument(
        "--toy-video",
        choices=["heldout", "train"],
        help="ShapesWorld-video prompts, clips judged exactly (a text-to-video model)",
    )
    src.add_argument(
        "--toy-audio",
        choices=["heldout", "train"],
        help="ToneWorld prompts, audio judged exactly (a text-to-audio model)",
    )
    src.add_argument(
        "--geneval-templates",
        dest="templates",
        type=int,
        nargs="?",
        const=100,
        metavar="N",
        help="build a GenEval-style suite from GenEval's templates over the COCO classes, N draws per tag "
        "(default 100; with --prompt-seed 43 it is GenEval's own 553-prompt file)",
    )
    src.add_argument(
        "--prompts",
        action="append",
        help="plain prompt file for reward-only eval: PartiPrompts .tsv, "
        "HPSv2 benchmark .json, .txt, .jsonl (repeatable)",
    )
    ev.add_argument(
        "--n-prompts",
        type=int,
        default=None,
        help="use N prompts, balanced over tags/categories (--toy: draw N, default 60)",
    )
    ev.add_argument(
        "--prompt-seed", type=int, default=None, help="seed of --toy (0) / --geneval-templates (43) prompts"
    )
    ev.add_argument("--per-prompt", type=int, default=4, help="images per prompt (GenEval: 4)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default 20 with --toy, else 50)")
    ev.add_argument(
        "--guidance", type=float, default=None, help="CFG scale (default 4.0 with --toy, else 9.0)"
    )
    ev.add_argument("--size", type=int, default=None, help="image height and width (default: the pipeline's)")
    ev.add_argument("--seed", type=int, default=0, help="base seed; image (i, k) uses image_seed(seed, i, k)")
    ev.add_argument(
        "--detector",
        default=None,
        help="shapes | mask2former | mask2former=PATH (hub id or folder; "
        "default shapes with --toy, else mask2former)",
    )
    ev.add_argument(
        "--color-clip",
        default=None,
        help="CLIP for colour classification (transformers or OpenCLIP "
        "folder / hub id; default openai/clip-vit-large-patch14)",
    )
    ev.add_argument(
        "--threshold", type=float, default=Thresholds.score, help="detection confidence (GenEval 0.3)"
    )
    ev.add_argument(
        "--counting-threshold", type=float, default=Thresholds.counting, help="for counting (GenEval 0.9)"
    )
    ev.add_argument("--max-objects", type=int, default=Thresholds.max_objects, help="per class (GenEval 16)")
    ev.add_argument(
        "--position-threshold", type=float, default=Thresholds.position, help="position margin (GenEval 0.1)"
    )
    ev.add_argument(
        "--reward", action="append", default=[], help="NAME or NAME=PATH, e.g. pickscore=PATH (repeatable)"
    )
    ev.add_argument(
        "--pairing",
        default="all",
        choices=["all", "seed"],
        help="win-rate comparisons per prompt: every B image vs every A image, or same-seed pairs",
    )
    ev.add_argument("--batch", type=int, default=16, help="images per generation / scoring batch")
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs")
    ev.add_argument("--no-report", action="store_true", help="skip the HTML/markdown report")
    ev.add_argument("--out", required=True, help="run folder (rerun to continue)")


def run_cli(args: argparse.Namespace) -> int:
    if args.toy_video or args.toy_audio:
        return run_av_cli(args)
    cfg = EvalConfig(
        model=args.model,
        out=args.out,
        compare=args.compare,
        metadata=args.metadata,
        toy=args.toy,
        templates=args.templates,
        prompts=args.prompts or [],
        n_prompts=args.n_prompts,
        prompt_seed=args.prompt_seed,
        per_prompt=args.per_prompt,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        seed=args.seed,
        detector=args.detector,
        color_clip=args.color_clip,
        thresholds=Thresholds(
            args.threshold,
            args.counting_threshold,
            args.max_objects,
            Thresholds.nms_iou,
            args.position_threshold,
        ),
        rewards=args.reward,
        pairing=args.pairing,
        batch=args.batch,
        device=args.device,
        n_boot=args.bootstrap,
        report=not args.no_report,
    )
    out = run_eval(cfg)
    print(format_summary(out))
    return 0


def run_av_cli(args: argparse.Namespace) -> int:
    """``--toy-video`` / ``--toy-audio``: the toy video / audio worlds, judged exactly (see toyworlds/av_bench.py)."""
    from ..toyworlds.av_bench import World, evaluate_and_report

    name, split = ("video", args.toy_video) if args.toy_video else ("audio", args.toy_audio)
    if name == "video":
        from ..toyworlds import video as mod

        w = World("video", "", "", mod.prompts, mod.judge_clip)
    else:
        from ..toyworlds import tones as mod

        w = World("audio", "", "", mod.prompts, mod.judge_audio)  # type: ignore[arg-type]
    models = {"model": args.model} | ({"compare": args.compare} if args.compare else {})
    out = evaluate_and_report(
        w,
        models,
        Path(args.out),
        split,
        args.n_prompts or 60,
        args.per_prompt,
        args.seed if args.prompt_seed is None else args.prompt_seed,
        args.steps or 15,
        args.guidance if args.guidance is not None else 4.0,
        device=args.device,
    )
    print(out["table"])
    print(f"report: {Path(args.out) / 'index.html'}")
    return 0


def format_summary(out: Mapping[str, Any]) -> str:
    """A short plain-text table of the results for the console."""
    lines = []
    if out.get("judged"):
        labels = list(out["models"])
        tags = list(next(iter(out["models"].values()))["geneval"]["per_tag"])
        lines.append("tag".ljust(14) + "".join(lb.rjust(10) for lb in labels))
        for t in tags:
            lines.append(
                t.ljust(14) + "".join(f"{out['models'][lb]['geneval']['per_tag'][t]:10.3f}" for lb in labels)
            )
        lines.append(
            "overall".ljust(14) + "".join(f"{out['models'][lb]['geneval']['overall']:10.3f}" for lb in labels)
        )
        if "difference" in out:
            d = out["difference"]
            lines.append(
                f"compare - model: {d['overall']:+.3f} (95% CI [{d['overall_ci95'][0]:+.3f}, "
                f"{d['overall_ci95'][1]:+.3f}])"
            )
    for key, per_model in out.get("rewards", {}).items():
        stats = ", ".join(
            f"{lb} mean {s['mean']:.4g} median {s['median']:.4g}" for lb, s in per_model.items()
        )
        lines.append(f"{key}: {stats}")
        if key in out.get("win_rates", {}):
            w = out["win_rates"][key]
            lines.append(
                f"  win rate of compare: mean {w['win_rate_mean']:.3f} [{w['win_rate_mean_ci95'][0]:.3f}, "
                f"{w['win_rate_mean_ci95'][1]:.3f}], median {w['win_rate_median']:.3f}"
            )
    return "\n".join(lines)
