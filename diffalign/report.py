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
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
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


def _img_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(folder: Path, title: str, table_md: str, sections: list[tuple[str, Path | None, str]],
                 metrics: dict[str, Any]) -> Path:
    """``sections``: (heading, PNG path or None, text). Writes report.md, index.html, metrics.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    md = [f"# {title}", "", table_md, ""]
    body = [f"<h1>{html.escape(title)}</h1>", "<pre>" + html.escape(table_md) + "</pre>"]
    for heading, png, text in sections:
        md += [f"## {heading}", "", text, ""]
        body += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(text)}</p>"]
        if png is not None:
            md += [f"![{heading}]({png.name})", ""]
            body.append(_img_tag(png, heading))
    (folder / "report.md").write_text("\n".join(md))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{image-rendering:pixelated;"
            "max-width:100%}pre{background:#f4f4f4;padding:1em}</style></head><body>" + "\n".join(body) + "</body></html>")
    (folder / "index.html").write_text(page)
    return folder / "index.html"
