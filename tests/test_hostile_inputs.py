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


def _jsonl_pairs(folder: Path, chosen: str, rejected: str = "b.png") -> Path:
    import json

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / name)
    path = folder / "pairs.jsonl"
    rows = [
        {"caption": "a red circle", "chosen": "a.png", "rejected": "b.png"},
        {"caption": "a blue square", "chosen": chosen, "rejected": rejected},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_paths_may_not_leave_the_data_folder(tmp_path: Path):
    import pytest

    from diffalign.config import DataConfig
    from diffalign.data.pairs import DataError, PairDataset

    secret = tmp_path / "secret.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(secret)
    data = tmp_path / "data"
    for bad in ("../secret.png", str(secret)):
        path = _jsonl_pairs(data, bad)
        with pytest.raises(DataError) as e:
            PairDataset(DataConfig(path=str(path), resolution=32), verbose=False)
        msg = str(e.value)
        assert "\n" not in msg and f"{path} line 2" in msg and "'chosen'" in msg
        assert "data.allow_outside_paths=true" in msg
    # explicitly allowed: read, and the pixels are the outside file's
    ds = PairDataset(DataConfig(path=str(path), resolution=32, allow_outside_paths=True), verbose=False)
    win, _, skipped = ds.load_pair(1)
    assert skipped == 0 and np.asarray(win.convert("RGB"))[0, 0].tolist() == [255, 0, 0]


def test_non_finite_and_out_of_range_options_fail_validate_before_any_model_loads(tmp_path: Path):
    import pytest

    from diffalign.config import ConfigError, load_config, validate

    base = ["model.path=/no/such/model", f"data.path={tmp_path}/none.parquet"]
    cases = [
        ("train.lr=.inf", "train.lr: must be a finite number"),
        ("train.lr=-1e-4", "train.lr: must be >= 0"),
        ("train.lr=1e39", "train.lr: must be <= 1"),
        ("objective.beta=.nan", "objective.beta: must be a finite number"),
        ("train.adam_beta2=1.0", "train.adam_beta2: must be in [0, 1)"),
        ("train.adam_eps=0", "train.adam_eps: must be > 0"),
        ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0"),
        ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
        ("lora.dropout=1.0", "lora.dropout: must be in [0, 1)"),
        ("lora.alpha=0", "lora.alpha: must be > 0"),
        ("train.max_bad_steps=0", "train.max_bad_steps: must be >= 1"),
        ("data.max_pairs=0", "data.max_pairs: must be >= 1"),
    ]
    for override, message in cases:
        with pytest.raises(ConfigError) as e:
            validate(load_config(None, [*base, override]), check_data=False)
        assert message in str(e.value) and "\n" not in str(e.value), (override, str(e.value))


# ----------------------------------------------------------------------------- one error path (CLI)


def _cli(*args: str, cwd: Path | None = None):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "diffalign.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def _one_error_line(res, *needles: str) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.replace("\r", "\n").splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-3000:]  # (a progress bar may be redrawn after it)
    last = errors[0]
    for n in needles:
        assert n in last, (n, last)
    return last


def test_malformed_and_non_utf8_configs_are_one_line(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\ntrain: [unclosed\n")
    _one_error_line(_cli("validate", str(bad)), str(bad), "line", "not valid YAML")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  path: caf\xe9\n".encode("latin-1"))
    _one_error_line(_cli("validate", str(latin)), str(latin), "not UTF-8")
    # --debug shows the traceback instead
    res = _cli("--debug", "validate", str(bad))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_non_utf8_jsonl_and_truncated_parquet_are_one_line(tmp_path: Path, pairs_parquet: Path):
    data = tmp_path / "d"
    data.mkdir()
    jl = data / "pairs.jsonl"
    jl.write_bytes(b'{"caption": "a", "chosen": "a.png", "rejected": "b.png"}\n{"caption": "caf\xe9"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: /no/such/model\n")
    _one_error_line(
        _cli("train", str(cfg), f"data.path={jl}", f"train.output_dir={tmp_path / 'r'}"),
        f"{jl} line 2",
        "not UTF-8",
    )
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(pairs_parquet.read_bytes()[:-300])  # the footer is gone
    _one_error_line(_cli("validate", str(cfg), f"data.path={cut}"), str(cut), "not a readable parquet")


def test_output_folder_that_is_a_file_is_one_line(tmp_path: Path, tiny_models, pairs_parquet):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    res = _cli(
        "train",
        str(cfg),
        f"model.path={tiny_models['sd']}",
        f"data.path={pairs_parquet}",
        "data.resolution=32",
        f"train.output_dir={blocker}",
    )
    _one_error_line(res, str(blocker), "is a file")


def test_a_full_disk_while_checkpointing_leaves_no_tmp_and_keeps_the_last_checkpoint(
    tmp_path: Path, tiny_models, pairs_parquet, monkeypatch, capsys
):
    """ENOSPC in the middle of writing step 2's checkpoint (simulated: a tmpfs needs privileges the CI
    may not have): one line, no ``.tmp`` folder left, step 1 intact and resumable."""
    import errno

    import torch

    from diffalign import cli
    from diffalign.train.checkpoint import verify_checkpoint

    out = tmp_path / "run"
    args = [
        "train",
        str(tmp_path / "c.yaml"),
        f"model.path={tiny_models['sd']}",
        f"data.path={pairs_parquet}",
        "data.resolution=32",
        "objective.beta=100",
        "train.max_steps=2",
        "train.checkpoint_every=1",
        f"train.output_dir={out}",
    ]
    (tmp_path / "c.yaml").write_text("")
    real_save = torch.save
    calls = {"n": 0}

    def filling_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # optimizer.pt of the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_disk)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    # in-process, bars left open by earlier tests are cleared with cursor codes before the line
    errors = [ln[ln.index("error: ") :] for ln in err.replace("\r", "\n").splitlines() if "error: " in ln]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "Traceback" not in err, err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step-000001"]
    assert verify_checkpoint(out / "checkpoints" / "step-000001") is None
    monkeypatch.setattr(torch, "save", real_save)
    assert cli.main([*args, "--resume"]) == 0
    assert (out / "checkpoints" / "step-000002").is_dir()


def test_a_real_full_disk_loses_nothing_that_was_complete(tmp_path: Path, tiny_models, pairs_parquet):
    """train.output_dir on a small tmpfs that fills up mid-run (skipped where tmpfs cannot be mounted):
    one error line, no ``.tmp`` left, every checkpoint written before verifies and resumes elsewhere."""
    import os
    import shutil
    import subprocess

    import pytest

    from diffalign.train.checkpoint import verify_checkpoint

    mnt = tmp_path / "small"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here")
    (tmp_path / "c.yaml").write_text("")
    args = [
        "train",
        str(tmp_path / "c.yaml"),
        f"model.path={tiny_models['sd']}",
        f"data.path={pairs_parquet}",
        "data.resolution=32",
        "objective.beta=100",
        "train.max_steps=40",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=100",
        "train.report_to=none",
    ]
    try:
        out = mnt / "run"
        res = _cli(*args, f"train.output_dir={out}")
        last = _one_error_line(res, "No space left on device")
        done = sorted(p for p in (out / "checkpoints").glob("step-*"))
        assert done and not [p for p in done if p.name.endswith(".tmp")], (last, done)
        assert all(verify_checkpoint(p) is None for p in done)
        # what was complete resumes on a disk with room
        moved = tmp_path / "moved"
        shutil.copytree(out, moved)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
    (moved / ".lock").unlink(missing_ok=True)
    res = _cli(*args, f"train.output_dir={moved}", "--resume")
    assert res.returncode == 0, res.stderr[-3000:]


def test_validate_reads_every_jsonl_row(tmp_path: Path):
    """validate parses the JSONL (rows, keys, labels, paths) without decoding images."""
    path = _jsonl_pairs(tmp_path / "d", "a.png")
    with path.open("a") as f:
        f.write('["not", "an", "object"]\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  path: /no/such/model\n")
    _one_error_line(
        _cli("validate", str(cfg), f"data.path={path}"), f"{path} line 3", "expected a JSON object"
    )
