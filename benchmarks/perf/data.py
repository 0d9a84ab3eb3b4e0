"""Synthetic Pick-a-Pic style pair files for the performance benchmarks (ShapesWorld renders)."""

from __future__ import annotations

import io
from pathlib import Path


def write_pairs(path: Path, n: int, resolution: int, seed: int = 0) -> Path:
    """``n`` pairs at ``resolution`` px: two renders of the same caption (PNG), winner first."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from diffalign.benchmarks.toyworlds.shapes import make_dataset

    def png(a) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return buf.getvalue()

    first = list(make_dataset(n, seed, "train", resolution))
    second = list(make_dataset(n, seed + 1, "train", resolution))
    rows = {
        "caption": [c for _, c, _ in first],
        "jpg_0": [png(a) for a, _, _ in first],
        "jpg_1": [png(b) for b, _, _ in second],
        "label_0": [1.0] * n,
        "label_1": [0.0] * n,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=256)
    return path
