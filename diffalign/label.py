"""``diffalign label``: score a pair dataset with reward models and write the scores and an
AI-feedback label back as new columns (the SmPO / Diffusion-DPO ``--choice_model`` pattern).

For every reward ``NAME``: columns ``score_0.NAME`` and ``score_1.NAME``; then ``ai_label_0`` is
1.0 when image 0 wins the reward vote (more rewards prefer it), 0.0 when image 1 does and 0.5 on a
tie. The original columns are kept untouched, so ``data.label_column``-style relabelling is a
column swap away. Reads and writes one row group at a time (memory stays flat) and writes to a
temporary file renamed at the end.

Rows that cannot be scored are counted skips, as in training (which skips the same rows): a row
whose image is undecodable (corrupt, truncated, not an image, a decompression bomb) or whose
caption is not a non-empty string is left out of the output, with a warning naming the row, and
the count is printed at the end. Images of any mode or bit depth are read as 8-bit RGB
(:func:`diffalign.data.media.to_rgb`). Bad options, a missing output folder and a file with no
scorable row are one-line errors, raised before any reward model loads where possible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError


def _open_image(blob: Any) -> Any:
    """One cell -> an 8-bit RGB image; raises one of ``DECODE_ERRORS`` when it is not one."""
    from PIL import Image

    from .data.media import decode_media

    if not isinstance(blob, bytes | bytearray):
        raise ValueError(f"expected image bytes, got {type(blob).__name__}")
    im = decode_media(bytes(blob))
    if not isinstance(im, Image.Image):
        raise ValueError(f"holds {type(im).__name__.lower()} media, not an image")
    return im


def _stack(imgs: list[Any], size: int | None) -> Any:
    """Images -> ``[B, 3, size, size]`` in [0, 1] (a torch tensor)."""
    import torch
    from PIL import Image

    size = size or max(max(im.size) for im in imgs)
    arr = np.stack([np.asarray(im.resize((size, size), Image.BICUBIC)) for im in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def _row_images(cap: Any, blobs: tuple[Any, Any]) -> tuple[list[Any], str | None]:
    """Both images of one row, or why the row cannot be scored."""
    from .data.media import DECODE_ERRORS

    if not isinstance(cap, str) or not cap.strip():
        return [], f"caption {cap!r} is not a non-empty string"
    images = []
    for col, blob in zip(("jpg_0", "jpg_1"), blobs, strict=True):
        try:
            images.append(_open_image(blob))
        except DECODE_ERRORS as e:
            return [], f"{col} is not a readable image ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    return images, None


def _readable_rows(tbl: Any, first_row: int, src: Path) -> tuple[list[int], list[Any], list[Any]]:
    """Indices (within ``tbl``) of the rows that can be scored, and their decoded images; the others
    are reported, one warning each."""
    keep: list[int] = []
    im0: list[Any] = []
    im1: list[Any] = []
    cols = [tbl.column(c).to_pylist() for c in ("caption", "jpg_0", "jpg_1")]
    for r, (cap, b0, b1) in enumerate(zip(*cols, strict=True)):
        images, problem = _row_images(cap, (b0, b1))
        if problem is not None:
            print(f"warning: label: skipping {src} row {first_row + r}: {problem}")
            continue
        keep.append(r)
        im0.append(images[0])
        im1.append(images[1])
    return keep, im0, im1


def check_label_options(data: str, out: str, resize: int | None) -> tuple[Path, Path]:
    """One-line errors for what can be checked before any reward model loads."""
    from .data.pairs import PICKAPIC_REQUIRED, check_columns

    src, dst = Path(data), Path(out)
    if not src.is_file():
        raise ConfigError(f"label: {data!r} is not a parquet file")
    if resize is not None and resize < 1:
        raise ConfigError(f"label --resize: must be >= 1 (a square size in pixels), got {resize}")
    if dst.is_dir():
        raise ConfigError(f"label: output {out!r} is a folder; give a file name, e.g. {out}/labelled.parquet")
    if not dst.parent.is_dir():
        raise ConfigError(
            f"label: the output's folder {str(dst.parent)!r} does not exist; create it or write elsewhere"
        )
    if dst.resolve() == src.resolve():
        raise ConfigError(f"label: output {out!r} is the input file; write the labelled copy elsewhere")
    check_columns(src, PICKAPIC_REQUIRED, "Pick-a-Pic")
    return src, dst


def label_pairs(data: str, rewards: list[str], out: str, resize: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, dst = check_label_options(data, out, resize)  # before the reward models load
    from .rewards import load_rewards

    models = load_rewards(rewards)
    pf = pq.ParquetFile(src)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = None
    first_row = kept = 0
    try:
        for g in range(pf.num_row_groups):
            tbl = pf.read_row_group(g)
            keep, im0, im1 = _readable_rows(tbl, first_row, src)
            first_row += tbl.num_rows
            if not keep:
                continue
            tbl = tbl.take(pa.array(keep, type=pa.int64())) if len(keep) < tbl.num_rows else tbl
            caps = tbl.column("caption").to_pylist()
            x0, x1 = _stack(im0, resize), _stack(im1, resize)
            votes = np.zeros(len(caps))
            for name, r in models.items():
                s0, s1 = r(x0, caps).scores.numpy(), r(x1, caps).scores.numpy()
                tbl = tbl.append_column(f"score_0.{name}", pa.array(s0.astype(np.float64)))
                tbl = tbl.append_column(f"score_1.{name}", pa.array(s1.astype(np.float64)))
                votes += np.sign(s0 - s1)
            tbl = tbl.append_column(
                "ai_label_0", pa.array(np.where(votes > 0, 1.0, np.where(votes < 0, 0.0, 0.5)))
            )
            if writer is None:
                writer = pq.ParquetWriter(tmp, tbl.schema)
            writer.write_table(tbl)
            kept += len(keep)
        if writer is None:
            raise ConfigError(
                f"label: {src} has no pair to score ({first_row} rows, none with a caption and two "
                "readable images)"
            )
        writer.close()
        os.replace(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    print(f"label: {kept} pairs scored, {first_row - kept} skipped (unreadable image or no caption)")
    return dst
