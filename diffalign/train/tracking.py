"""Where a run's metrics and samples go: ``train.report_to`` (tensorboard, wandb, none) and the
sample grids written at every checkpoint (``train.sample_prompts``).

Both training entry points (the offline loop and the online one) call these, so a run logs the
same way whatever feeds it. ``metrics.jsonl`` is written by the loops themselves in every case.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Config
from ..report import image_grid, save_png, video_strips

SAMPLE_SEED = 1234
"""Seed of the first sample prompt's image (prompt i uses SAMPLE_SEED + i): the same noise at every
checkpoint, so the grids show how the same images change over training."""


def log_with(cfg: Config) -> str | None:
    """accelerate's ``log_with`` for ``train.report_to``."""
    return None if cfg.train.report_to == "none" else cfg.train.report_to


def init_tracking(
    accelerator: Any, cfg: Config, hparams: dict[str, Any], purge_step: int | None = None
) -> None:
    """Start the tracker (main process only; accelerate ignores the call elsewhere). ``purge_step``
    (a resume): TensorBoard drops events of this step and later, which a killed run had logged past
    its checkpoint; W&B continues the run of the same id."""
    if cfg.train.report_to == "none":
        return
    folder = Path(cfg.train.output_dir).resolve()
    if cfg.train.report_to == "tensorboard":
        name, kwargs = "tb", ({"tensorboard": {"purge_step": purge_step}} if purge_step else {})
    else:
        name, kwargs = (
            folder.name,
            {"wandb": {"dir": str(folder), "id": _wandb_id(folder), "resume": "allow"}},
        )
    accelerator.init_trackers(name, config=hparams, init_kwargs=kwargs)


def _wandb_id(folder: Path) -> str:
    """A stable W&B run id per run folder (so a resume continues the same W&B run)."""
    import hashlib

    return hashlib.sha256(str(folder).encode()).hexdigest()[:16]


def sample_grid(adapter: Any, cfg: Config, autocast: Any = nullcontext) -> np.ndarray:
    """uint8 ``[H,W,3]``: one sample per ``train.sample_prompts`` with the current weights.

    Images form a row; video clips a row of frames each; audio clips their spectrograms. Runs in
    eval mode with a forked RNG, so the training run's random stream is untouched (resumes stay
    exact whether or not samples are drawn)."""
    from ..models.generate import generate_media
    from ..models.loading import pipeline_call_defaults

    t = cfg.train
    prompts = list(t.sample_prompts)
    pipe = adapter.pipe
    pipe.set_progress_bar_config(disable=True)
    denoiser = adapter.denoiser
    was_training = denoiser.training
    denoiser.eval()
    try:
        with torch.random.fork_rng(devices=[]), autocast():
            media = generate_media(
                pipe,
                prompts,
                1,
                [SAMPLE_SEED + i for i in range(len(prompts))],
                t.sample_steps,
                t.sample_guidance,
                **pipeline_call_defaults(cfg.model.path),
            )
    finally:
        denoiser.train(was_training)
    if adapter.modality == "video":
        return video_strips(np.stack(media))  # [N,F,h,w,3] -> a row of frames per prompt
    if adapter.modality == "audio":
        return _spectrogram_grid(np.stack(media), prompts, int(pipe.vocoder.config.sampling_rate))
    return image_grid(np.stack(media), cols=min(len(prompts), 8))


def _spectrogram_grid(waves: np.ndarray, prompts: list[str], sample_rate: int) -> np.ndarray:
    import tempfile

    from PIL import Image

    from ..report import spectrogram_png

    with tempfile.TemporaryDirectory() as d:
        path = spectrogram_png(waves, prompts, sample_rate, Path(d) / "s.png")
        return np.asarray(Image.open(path).convert("RGB"))


def log_samples(accelerator: Any, adapter: Any, cfg: Config, step: int) -> Path | None:
    """Write ``samples/step-N.png`` and send it to the tracker (main process; no-op without prompts)."""
    if not cfg.train.sample_prompts or not accelerator.is_main_process:
        return None
    grid = sample_grid(adapter, cfg, accelerator.autocast)
    folder = Path(cfg.train.output_dir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = save_png(grid, folder / f"step-{step}.png")
    if cfg.train.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", grid, step, dataformats="HWC")
        writer.flush()
    elif cfg.train.report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log(
            {"samples": wandb.Image(grid, caption=" | ".join(cfg.train.sample_prompts))}, step=step
        )
    return path
