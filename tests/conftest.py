from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs_parquet(path: Path, n: int = 8, size: int = 32, seed: int = 0, labels: list | None = None,
                       captions: list | None = None, corrupt_rows: tuple[int, ...] = (), drop_columns: tuple[str, ...] = ()) -> Path:
    """A small Pick-a-Pic v2 style parquet: caption, jpg_0, jpg_1, label_0, label_1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    words = ["a red circle", "a blue square", "a photo of a dog", "two green triangles"]
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        b = (rng.random((size + 8 * (i % 2), size, 3)) * 255).astype(np.uint8)  # loser of another size sometimes
        lab = labels[i] if labels is not None else float(i % 2)
        rows["caption"].append(captions[i] if captions is not None else words[i % len(words)])
        rows["jpg_0"].append(b"not an image" if i in corrupt_rows else _png(a))
        rows["jpg_1"].append(_png(b))
        rows["label_0"].append(lab)
        rows["label_1"].append(1.0 - lab if isinstance(lab, float) else lab)
    for c in drop_columns:
        rows.pop(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=4)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved pipelines of every family (built once per test session)."""
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in ("sd", "sdxl", "sd3"):
        build_tiny_pipeline(fam, root / fam)
        out[fam] = root / fam
    build_tiny_pipeline("sd", root / "sd-v", prediction_type="v_prediction")
    out["sd-v"] = root / "sd-v"
    return out


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> Path:
    return make_pairs_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", n=8)
