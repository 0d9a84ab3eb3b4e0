from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data import DataError, PairDataset, StepPlan, collate
from diffalign.data.pairs import joint_transform

from conftest import _png, make_pairs_parquet


def dcfg(path, **kw):
    return DataConfig(path=str(path), resolution=32, **kw)


def test_parquet_ties_swap_and_winner_first(tmp_path):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=6, labels=[1.0, 0.0, 0.5, 1.0, 0.0, 0.5])
    ds = PairDataset(dcfg(p))
    assert len(ds) == 4 and "dropped 2 ties" in ds.summary
    assert [r.swap for r in ds.rows] == [False, True, False, True]
    kept = PairDataset(dcfg(p, drop_ties=False))
    assert len(kept) == 6 and kept.rows[2].swap is False  # a kept tie: jpg_0 wins
    # row 1 has label_0 == 0, so the winner is jpg_1 (which is 40 px tall in the fixture: odd rows)
    win, lose, skipped = ds.load_pair(1)
    assert win.size == (32, 40) and lose.size == (32, 32) and skipped == 0


def test_item_shapes_and_micro(tmp_path):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=4, labels=[0.0, 0.0, 0.0, 0.0])
    ds = PairDataset(dcfg(p))
    item = ds[(1, 123)]  # winner is jpg_1: 32 wide, 40 tall -> resized to 32x40, center crop top=4
    assert item["pixels"].shape == (2, 3, 32, 32)
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    assert item["micro"].tolist() == [40, 32, 4, 0, 32, 32]
    batch = collate([ds[(0, 1)], ds[(1, 2)]])
    assert batch["pixels"].shape == (2, 2, 3, 32, 32) and batch["caption"][0] == "a red circle"


def test_joint_transform_resizes_loser_to_winner_and_flips_both():
    win = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (48, 1, 3)))
    lose = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (20, 1, 3))).resize((30, 20))
    g = torch.Generator().manual_seed(0)
    flipped = None
    for s in range(20):
        x, micro = joint_transform(
            [win, lose], 32, center_crop=False, flip=True, gen=torch.Generator().manual_seed(s)
        )
        assert micro[:2].tolist() == [48, 64]
        # the same horizontal gradient in both: flip/crop were applied jointly
        d0 = (x[0, 0, 0, -1] - x[0, 0, 0, 0]).sign()
        d1 = (x[1, 0, 0, -1] - x[1, 0, 0, 0]).sign()
        assert d0 == d1
        flipped = flipped or bool(d0 < 0)
    assert flipped
    del g


def test_missing_column_is_one_line_error(tmp_path):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=2, drop_columns=("label_0",))
    with pytest.raises(DataError, match=r"p.parquet: missing column 'label_0'") as e:
        PairDataset(dcfg(p))
    assert "\n" not in str(e.value)


def test_bad_label_names_row(tmp_path):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=3, labels=[1.0, 0.3, 0.0])
    with pytest.raises(DataError, match=r"p.parquet row 1: label_0=0.3 is not one of 0, 0.5, 1"):
        PairDataset(dcfg(p))


def test_empty_caption_is_counted_skip(tmp_path):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=4, labels=[1.0] * 4, captions=["a", "", "  ", "b"])
    ds = PairDataset(dcfg(p))
    assert len(ds) == 2 and "skipped 2 empty captions" in ds.summary


def test_corrupt_image_is_counted_skip(tmp_path, capsys):
    p = make_pairs_parquet(tmp_path / "p.parquet", n=4, labels=[1.0] * 4, corrupt_rows=(1,))
    ds = PairDataset(dcfg(p))
    item = ds[(1, 0)]
    assert (
        item["skipped"] == 1 and item["caption"] == ds.rows[2].caption
    )  # replaced by the next readable pair
    assert "skipping pair" in capsys.readouterr().out
    assert ds[(0, 0)]["skipped"] == 0


def test_jsonl_and_folder_formats(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        for side in ("chosen", "rejected"):
            (tmp_path / "f" / side).mkdir(parents=True, exist_ok=True)
            (tmp_path / "f" / side / f"{i}.png").write_bytes(
                _png((rng.random((32, 32, 3)) * 255).astype(np.uint8))
            )
        (tmp_path / "f" / "chosen" / f"{i}.txt").write_text(f"prompt {i}")
    ds = PairDataset(dcfg(tmp_path / "f"))
    assert ds.format == "folder" and len(ds) == 3 and ds[(2, 0)]["caption"] == "prompt 2"
    lines = [
        json.dumps({"caption": "x", "chosen": "f/chosen/0.png", "rejected": "f/rejected/0.png"}),
        json.dumps(
            {"caption": "y", "image_0": "f/chosen/1.png", "image_1": "f/rejected/1.png", "label_0": 0}
        ),
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    ds = PairDataset(dcfg(tmp_path / "pairs.jsonl"))
    assert ds.format == "jsonl" and [r.swap for r in ds.rows] == [False, True]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "x", "chosen": "a.png"}))
    with pytest.raises(DataError, match=r"bad.jsonl line 1: needs keys caption \+ chosen \+ rejected"):
        PairDataset(dcfg(tmp_path / "bad.jsonl"))


def test_step_plan_is_split_invariant():
    """The same global batch (pairs and per-sample seeds) whatever the batch/accum/world split."""

    def global_keys(B, A, W, step):
        plan = StepPlan(10, seed=3, batch_size=B, grad_accum=A, world_size=W)
        return sorted(k for m in range(A) for r in range(W) for k in plan.keys(step, m, r))

    for step in (0, 1, 2, 7):
        ref = global_keys(4, 1, 1, step)
        assert global_keys(1, 4, 1, step) == ref
        assert global_keys(2, 1, 2, step) == ref
        assert global_keys(1, 2, 2, step) == ref
    # every pair seen once per epoch (10 pairs, 4 per step: positions 0..9 cover the first epoch)
    plan = StepPlan(10, seed=3, batch_size=5, grad_accum=1)
    assert sorted(i for s in range(2) for i, _ in plan.keys(s, 0, 0)) == list(range(10))


def test_hf_datasets_source(tmp_path):
    """A `datasets` folder (save_to_disk) with the Pick-a-Pic schema; images as raw bytes columns."""
    import datasets
    import pyarrow.parquet as pq

    p = make_pairs_parquet(tmp_path / "p.parquet", n=5, labels=[1.0, 0.0, 0.5, 1.0, 0.0])
    ds = datasets.Dataset(pq.read_table(p))
    ds.save_to_disk(str(tmp_path / "hf"))
    got = PairDataset(dcfg(tmp_path / "hf"))
    assert got.format == "hf" and len(got) == 4 and [r.swap for r in got.rows] == [False, True, False, True]
    assert got[(1, 0)]["pixels"].shape == (2, 3, 32, 32)
    dd = datasets.DatasetDict({"train": ds})
    dd.save_to_disk(str(tmp_path / "hfdict"))
    with pytest.raises(DataError, match="data.split 'validation' not in"):
        PairDataset(dcfg(tmp_path / "hfdict", split="validation"))
