"""Run reports: image grids, plots, markdown and a self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def image_grid(images: np.ndarray, cols: int, pad: int = 2, scale: int = 2) -> np.ndarray:
    """uint8 ``[N,H,W,3]`` -> one uint8 grid image (nearest-neighbour upscaled by ``scale``)."""
    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = (
            im
        )
    return grid.repeat(scale, 0).repeat(scale, 1)


def save_png(arr: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(arr).save(path)
    return path


def loss_curve(metrics_jsonl: Path, out: Path, keys: Sequence[str] = ("loss", "implicit_acc")) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in metrics_jsonl.read_text().splitlines() if x.strip()]
    keys = [k for k in keys if rows and k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys, strict=True):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows])
        ax.set_xlabel("step")
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def tag_bars(per_tag: dict[str, dict[str, float]], out: Path) -> Path:
    """``per_tag[model][tag] = accuracy`` -> grouped bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(per_tag)
    tags = sorted({t for m in models for t in per_tag[m]})
    x = np.arange(len(tags))
    fig, ax = plt.subplots(figsize=(1.3 * len(tags) + 2, 3.2))
    for i, m in enumerate(models):
        ax.bar(x + i * 0.8 / len(models), [per_tag[m].get(t, 0) for t in tags], 0.8 / len(models), label=m)
    ax.set_xticks(x + 0.4 - 0.4 / len(models), tags, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_gif(frames: np.ndarray, path: Path, scale: int = 4, ms: int = 150) -> Path:
    """uint8 ``[F,H,W,3]`` -> looping animated GIF (nearest-neighbour upscaled)."""
    from PIL import Image

    big = frames.repeat(scale, 1).repeat(scale, 2)
    imgs = [Image.fromarray(f) for f in big]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=ms, loop=0)
    return path


def video_strips(clips: np.ndarray, scale: int = 2) -> np.ndarray:
    """uint8 ``[N,F,H,W,3]`` -> one image, a row of frames per clip."""
    n, f = clips.shape[:2]
    return image_grid(clips.reshape(n * f, *clips.shape[2:]), f, scale=scale)


def spectrogram_png(waves: np.ndarray, labels: Sequence[str], sample_rate: int, out: Path) -> Path:
    """Log-magnitude spectrograms of float ``[N,S]`` waveforms, one panel per clip."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(waves)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.2 * rows), squeeze=False)
    for ax, w, lab in zip(axes.flat, waves, labels, strict=False):
        ax.specgram(w, NFFT=256, Fs=sample_rate, noverlap=192, cmap="magma", vmin=-120)
        ax.set_title(lab, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


_MIME = {".png": "image/png", ".gif": "image/gif", ".wav": "audio/wav"}


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    mime = _MIME.get(path.suffix.lower(), "image/png")
    if mime.startswith("audio"):
        return f'<figure><audio controls src="data:{mime};base64,{data}"></audio><figcaption>{html.escape(alt)}</figcaption></figure>'
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'


def write_report(
    folder: Path,
    title: str,
    table_md: str,
    sections: list[tuple[str, Path | list[Path] | None, str]],
    metrics: dict[str, Any],
) -> Path:
    """``sections``: (heading, media path(s) or None, text); PNG/GIF images and WAV audio are inlined
    in the HTML (audio as playable players). Writes report.md, index.html, metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    md = [f"# {title}", "", table_md, ""]
    body = [f"<h1>{html.escape(title)}</h1>", "<pre>" + html.escape(table_md) + "</pre>"]
    for heading, png, text in sections:
        md += [f"## {heading}", "", text, ""]
        body += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>"]
        for media in [png] if isinstance(png, Path) else png or []:
            md += [
                f"[{media.name}]({media.name})" if media.suffix == ".wav" else f"![{heading}]({media.name})",
                "",
            ]
            body.append(_img_tag(media, media.stem if media.suffix == ".wav" else heading))
    (folder / "report.md").write_text("\n".join(md))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{image-rendering:pixelated;"
        "max-width:100%}pre{background:#f4f4f4;padding:1em}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )
    (folder / "index.html").write_text(page)
    return folder / "index.html"
