"""``diffalign label``: score a pair dataset with reward models and write the scores and an
AI-feedback label back as new columns (the SmPO / Diffusion-DPO ``--choice_model`` pattern).

For every reward ``NAME``: columns ``score_0.NAME`` and ``score_1.NAME``; then ``ai_label_0`` is
1.0 when image 0 wins the reward vote (more rewards prefer it), 0.0 when image 1 does and 0.5 on a
tie. The original columns are kept untouched, so ``data.label_column``-style relabelling is a
column swap away. Reads and writes one row group at a time (memory stays flat) and writes to a
temporary file renamed at the end.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError


def _decode(blobs: list[bytes], size: int | None) -> torch.Tensor:
    from PIL import Image

    imgs = []
    for b in blobs:
        im = Image.open(io.BytesIO(b)).convert("RGB")
        imgs.append(im)
    size = size or max(max(im.size) for im in imgs)
    arr = np.stack([np.asarray(im.resize((size, size), Image.BICUBIC)) for im in imgs])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def label_pairs(data: str, rewards: list[str], out: str, resize: int | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .data.pairs import PICKAPIC_REQUIRED, check_columns
    from .rewards import load_rewards

    src = Path(data)
    if not src.is_file():
        raise ConfigError(f"label: {data!r} is not a parquet file")
    check_columns(src, PICKAPIC_REQUIRED, "Pick-a-Pic")
    models = load_rewards(rewards)
    pf = pq.ParquetFile(src)
    dst = Path(out)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = None
    try:
        for g in range(pf.num_row_groups):
            tbl = pf.read_row_group(g)
            caps = tbl.column("caption").to_pylist()
            x0 = _decode(tbl.column("jpg_0").to_pylist(), resize)
            x1 = _decode(tbl.column("jpg_1").to_pylist(), resize)
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
        if writer is not None:
            writer.close()
        os.replace(tmp, dst)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst
