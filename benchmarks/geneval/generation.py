"""``diffalign eval`` generation: load a model, lay out GenEval image folders, make the missing images.

Images are generated with one fixed seed per (prompt, sample) (``image_seed(seed, i, k)``, see
:func:`diffalign.synpic.image_seed`), so two models see the same initial noise. A batch's make-up
still changes the images at bit level (CPU kernels round differently at other batch sizes), so they
are made on a fixed grid of batches of ``--batch`` (prompt, sample) positions, ``--per-prompt`` per
prompt: a resumed run makes exactly the batches an uninterrupted one does and its images are
bit-identical. Both are recorded with the model folder's sampling settings (``settings.py``), and a
rerun with other values is refused. Each PNG is written to a temporary name and renamed, so an
interrupted run leaves no half-written image.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from ...synpic import image_seed
from .settings import EvalConfig


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


def sample_path(folder: Path, i: int, k: int) -> Path:
    return folder / f"{i:05d}" / "samples" / f"{k:05d}.png"


def _atomic_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_image(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


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
    sampling: Mapping[str, Any],
    log=print,
) -> int:
    """Generate the images not yet on disk with ``sampling`` (steps, guidance, size); returns how many
    were made (the model loads only if any)."""
    import torch
    from tqdm.auto import tqdm

    # batches sit on a fixed grid of (prompt, sample) positions and a batch with any image missing is
    # generated whole: a resumed run then calls the pipeline on exactly the batches an uninterrupted
    # run does (CPU kernels round differently at other batch sizes), so its images are bit-identical
    grid = [(i, k) for i in range(len(rows)) for k in range(cfg.per_prompt)]
    batches = [grid[s : s + cfg.batch] for s in range(0, len(grid), cfg.batch)]
    missing = sum(not sample_path(folder, i, k).is_file() for i, k in grid)
    batches = [b for b in batches if any(not sample_path(folder, i, k).is_file() for i, k in b)]
    if not batches:
        return 0
    log(f"  generating {missing} images with {spec} ({len(grid) - missing} already done)")
    pipe, call_kw = load_model(spec, device)
    if sampling["size"] is not None:
        call_kw = {**call_kw, "height": sampling["size"], "width": sampling["size"]}
    made = 0
    for chunk in tqdm(batches, desc="generate", unit="batch", leave=False):
        gens = [torch.Generator().manual_seed(image_seed(cfg.seed, i, k)) for i, k in chunk]
        with torch.no_grad():
            imgs = pipe(
                [rows[i]["prompt"] for i, _ in chunk],
                num_inference_steps=sampling["steps"],
                guidance_scale=sampling["guidance"],
                generator=gens,
                output_type="np",
                **call_kw,
            ).images
        imgs = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
        for (i, k), img in zip(chunk, imgs, strict=True):
            if not sample_path(folder, i, k).is_file():  # those on disk are the same image already
                _atomic_png(img, sample_path(folder, i, k))
                made += 1
    del pipe
    return made
