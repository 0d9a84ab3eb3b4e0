"""Hostile inputs (the start of issue #24's bad-input corpus): each case asserts its outcome class,
a counted skip or a one-line error, never a traceback or a silently wrong result."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from conftest import _png


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height`` (CRC fixed): PIL refuses it on open
    with DecompressionBombError (more than twice its pixel limit), before decoding anything."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    raw[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr : ihdr + 17])))
    return bytes(raw)


def test_bomb_png_really_is_refused_by_pil():
    import pytest

    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(_bomb_png())).load()


def test_decompression_bomb_in_a_pair_is_a_counted_skip(tmp_path: Path):
    from diffalign.config import DataConfig
    from diffalign.data.pairs import PairDataset

    rng = np.random.default_rng(0)
    good = [_png((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    rows = {
        "caption": ["a red circle", "a blue square"],
        "jpg_0": [_bomb_png(), good[0]],
        "jpg_1": [good[1], good[2]],
        "label_0": [1.0, 1.0],
        "label_1": [0.0, 0.0],
    }
    path = tmp_path / "bomb.parquet"
    pq.write_table(pa.table(rows), path)
    ds = PairDataset(DataConfig(path=str(path), resolution=32), verbose=False)
    win, lose, skipped = ds.load_pair(0)  # row 0 holds the bomb: replaced by the next readable pair
    assert skipped == 1
    assert np.array_equal(
        np.asarray(win.convert("RGB")), np.asarray(Image.open(io.BytesIO(good[0])).convert("RGB"))
    )
    item = ds[(0, 123)]
    assert item["skipped"] == 1 and item["caption"] == "a blue square"
