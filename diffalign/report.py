"""Run reports: image grids, plots, markdown and a self-contained HTML page (images inlined)."""

from __future__ import annotations

import base64
import html
import json
import re
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
    # a key may be logged on some steps only (a rollout run logs its reward once per round, the
    # guard's rows carry no loss): each panel plots the rows that have its key
    keys = [k for k in keys if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
    for ax, k in zip(np.atleast_1d(axes), keys, strict=True):
        have = [r for r in rows if k in r]
        ax.plot([r["step"] for r in have], [r[k] for r in have])
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

Media = Path | tuple[Path, str]
"""A media file, or (file, caption): a captioned file is shown as a figure with its caption below."""
Text = str | list[str]
"""A paragraph, or a list of items (an ordered list)."""

_CSS = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{image-rendering:pixelated;"
    "max-width:100%}pre{background:#f4f4f4;padding:1em}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;"
    "padding:3px 8px;text-align:right}th:first-child,td:first-child{text-align:left}th{background:#f0f0f0}"
    ".figs{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;max-width:220px}"
    "figcaption{font-size:12px}"
)


def _data_uri(path: Path) -> tuple[str, str]:
    return _MIME.get(path.suffix.lower(), "image/png"), base64.b64encode(path.read_bytes()).decode()


def _media_html(path: Path, alt: str, caption: str | None = None) -> str:
    """A media file inlined: an image (a figure when captioned) or an audio player (always a figure)."""
    mime, data = _data_uri(path)
    if mime.startswith("audio"):
        inner = f'<audio controls src="data:{mime};base64,{data}"></audio>'
        caption = alt if caption is None else caption
    else:
        inner = f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{data}">'
    if caption is None:
        return inner
    return f"<figure>{inner}<figcaption>{html.escape(caption)}</figcaption></figure>"


def markdown_tables_html(md: str) -> str:
    """Paragraphs, pipe tables and numbered lists of a small markdown text as HTML (all text escaped;
    a cell written ``**x**`` is bold)."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            rows = [r for r in block if not all(set(c) <= set("-: ") for c in r)]
            head, body = rows[0], rows[1:]
            out.append(
                "<table><tr>"
                + "".join(f"<th>{_cell(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            continue
        if _NUMBERED.match(line):
            items = []
            while i < len(lines) and _NUMBERED.match(lines[i].strip()):
                items.append(_NUMBERED.sub("", lines[i].strip(), count=1))
                i += 1
            out.append(_list_html(items))
            continue
        if line:
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


_NUMBERED = re.compile(r"^\d+\. ")


_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _cell(text: str) -> str:
    """A table cell: escaped text with markdown ``**bold**`` spans (anywhere in the cell) as <b>."""
    return _BOLD.sub(lambda m: f"<b>{m.group(1)}</b>", html.escape(text))


def _list_html(items: Sequence[str]) -> str:
    return "<ol>" + "".join(f"<li>{html.escape(x)}</li>" for x in items) + "</ol>"


def _text_md(text: Text) -> list[str]:
    return [text] if isinstance(text, str) else [f"{i}. {x}" for i, x in enumerate(text, start=1)]


def _text_html(text: Text) -> str:
    return f"<p>{html.escape(text)}</p>" if isinstance(text, str) else _list_html(text)


def write_report(
    folder: Path,
    title: str,
    table_md: str,
    sections: Sequence[tuple[str, Media | Sequence[Media] | None, Text]],
    metrics: dict[str, Any],
) -> Path:
    """One report page, written as report.md, index.html (self-contained) and metrics.json.

    ``table_md``: markdown (paragraphs, pipe tables, numbered lists), rendered as HTML tables, lists
    and paragraphs. ``sections``: (heading, media, text); media is a file, (file, caption) or a list of
    them (PNG/GIF images and WAV audio are inlined; captioned images become figures with their caption
    below, side by side); text is a paragraph or a list of items. Every text is HTML-escaped."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    md = [f"# {title}", "", table_md, ""]
    body = [f"<h1>{html.escape(title)}</h1>", markdown_tables_html(table_md)]
    for heading, media, text in sections:
        md += [f"## {heading}", "", *_text_md(text), ""]
        body += [f"<h2>{html.escape(heading)}</h2>", _text_html(text)]
        items = [media] if isinstance(media, Path | tuple) else list(media or [])
        figs = []
        for item in items:
            path, caption = item if isinstance(item, tuple) else (item, None)
            if path.suffix == ".wav":
                md += [f"[{path.name}]({path.name})", ""]
            else:
                md += [f"![{caption or heading}]({path.name})", *([f"*{caption}*"] if caption else []), ""]
            alt = caption or (path.stem if path.suffix == ".wav" else heading)
            figs.append(_media_html(path, alt, caption))
        if any(isinstance(x, tuple) for x in items):
            body.append('<div class="figs">' + "".join(figs) + "</div>")
        else:
            body += figs
    (folder / "report.md").write_text("\n".join(md))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
        f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>"
    )
    (folder / "index.html").write_text(page)
    return folder / "index.html"
