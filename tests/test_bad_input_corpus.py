"""The bad-input corpus of issue #24: one table of hostile inputs across the commands (configs, CLI
options, data files, images, run folders, cache options, label, eval, demo, toy), each with the exact
outcome class it must end in:

- ``error``: exit code 2 and exactly one ``error:`` line holding the given text, no traceback (a Python
  call: a one-line :class:`~diffalign.errors.ConfigError`);
- ``skip``: exit code 0 (or a normal return), the skip counted where the command reports it and the
  rest of the result correct;
- ``ok``: exit code 0 (or a normal return) and the result checked, image pixels against an independent
  conversion.

Every case runs under a timeout (subprocess ``timeout=``, Python calls in a watched thread), so a hang
fails the case instead of the suite. Together with ``tests/test_hostile_inputs.py`` (decompression
bomb, JSONL paths leaving their folder, non-finite options, malformed YAML/JSONL, truncated parquet,
an output folder that is a file, a full disk) and the cache and Syn-Pic shard cases kept next to
their code's tests, this is the corpus. A case whose fix lies in a file this corpus's owner does not
edit is ``xfail(strict=True)``, the file named in the reason (strict: the fix turns it into a failure
until the mark is removed).

Chosen outcomes worth knowing: in ``diffalign label`` a row with an undecodable image or no caption is
a counted skip (left out of the output, as training would skip it), not an error; ``--resume`` on a
run folder with no checkpoint starts the run from step 0; transparency is composited over white.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import _png, build_tiny_clip, make_pairs_parquet

CLI_TIMEOUT_S = 120
CALL_TIMEOUT_S = 60
Expect = Literal["error", "skip", "ok"]


# ----------------------------------------------------------------------------- the harness


@dataclass
class Env:
    """One case's scratch folder and the session's shared inputs (built once)."""

    tmp: Path
    shared: dict[str, Path]

    @property
    def sd(self) -> str:
        return str(self.shared["sd"])

    @property
    def clip(self) -> str:
        return str(self.shared["clip"])

    @property
    def pairs(self) -> str:
        return str(self.shared["pairs"])

    def empty_config(self) -> str:
        cfg = self.tmp / "c.yaml"
        cfg.write_text("")
        return str(cfg)

    def file(self, name: str, data: bytes | str) -> str:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p)


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    value: Any = None
    exc: BaseException | None = None


@dataclass
class Case:
    id: str
    expect: Expect
    cli: Callable[[Env], list[str]] | None = None
    """The command line after ``diffalign``, run as a subprocess."""
    call: Callable[[Env], Any] | None = None
    """A Python call, run in a watched thread."""
    needle: str | tuple[str, ...] = ()
    """Text the error line must hold."""
    check: Callable[[Env, Outcome], None] | None = None
    """The result of a ``skip`` or ``ok`` case (and anything else an ``error`` case must leave)."""
    xfail: str | None = None


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One tiny SD pipeline, one tiny CLIP (the label reward) and one good pair parquet."""
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("corpus")
    build_tiny_pipeline("sd", root / "sd")
    return {
        "sd": root / "sd",
        "clip": build_tiny_clip(root / "clip"),
        "pairs": make_pairs_parquet(root / "pairs.parquet", n=8),
    }


def _run_cli(args: list[str]) -> Outcome:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run(
        [sys.executable, "-m", "diffalign.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env,
    )
    return Outcome(res.returncode, res.stdout, res.stderr)


def _run_call(fn: Callable[[], Any]) -> Outcome:
    """``fn()`` in a daemon thread (a hang fails the case after CALL_TIMEOUT_S), stdout captured."""
    box: dict[str, Any] = {}
    out, err = io.StringIO(), io.StringIO()

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # reported below as the outcome
            box["exc"] = e

    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        t = threading.Thread(target=target, daemon=True)
        t.start()
        t.join(CALL_TIMEOUT_S)
    assert not t.is_alive(), f"hung for more than {CALL_TIMEOUT_S} s"
    exc = box.get("exc")
    return Outcome(0 if exc is None else 2, out.getvalue(), err.getvalue(), box.get("value"), exc)


def _error_lines(text: str) -> list[str]:
    return [ln for ln in text.replace("\r", "\n").splitlines() if ln.startswith("error:")]


def _assert_outcome(case: Case, env: Env, res: Outcome) -> None:
    needles = (case.needle,) if isinstance(case.needle, str) else case.needle
    if case.cli is not None:
        tail = (res.err + res.out)[-3000:]
        assert "Traceback" not in res.err, tail
        if case.expect == "error":
            assert res.rc == 2, (res.rc, tail)
            lines = _error_lines(res.err)
            assert len(lines) == 1, lines
            assert not _error_lines(res.out), res.out[-1000:]
            for n in needles:
                assert n in lines[0], (n, lines[0])
        else:
            assert res.rc == 0 and not _error_lines(res.err), (res.rc, tail)
    else:
        from diffalign.errors import ConfigError

        if case.expect == "error":
            assert isinstance(res.exc, ConfigError), repr(res.exc)
            msg = str(res.exc)
            assert "\n" not in msg and msg.strip(), msg
            for n in needles:
                assert n in msg, (n, msg)
        elif res.exc is not None:
            raise res.exc
    if case.check is not None:
        case.check(env, res)


# ----------------------------------------------------------------------------- builders


def _yaml(env: Env, text: str) -> str:
    return env.file("cfg.yaml", text)


def _validate(env: Env, *overrides: str) -> list[str]:
    return ["validate", env.empty_config(), f"model.path={env.sd}", f"data.path={env.pairs}", *overrides]


def _train(env: Env, *overrides: str, out: str = "run") -> list[str]:
    return [
        "train",
        env.empty_config(),
        f"model.path={env.sd}",
        f"data.path={env.pairs}",
        "data.resolution=32",
        "train.max_steps=1",
        f"train.output_dir={env.tmp / out}",
        *overrides,
    ]


def _prompts(env: Env) -> str:
    """A prompts file for the rollout objectives (one prompt per line)."""
    return env.file("prompts.txt", "a red circle\na blue square\n")


def _pairs_table(env: Env, name: str = "p.parquet", **columns: list) -> str:
    """A two-row Pick-a-Pic parquet; ``columns`` replace the defaults (None drops a column)."""
    rng = np.random.default_rng(3)
    good = [_png((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    rows: dict[str, list] = {
        "caption": ["a red circle", "a blue square"],
        "jpg_0": good[:2],
        "jpg_1": good[2:],
        "label_0": [1.0, 0.0],
        "label_1": [0.0, 1.0],
    }
    for k, v in columns.items():
        if v is None:
            rows.pop(k)
        else:
            rows[k] = v
    path = env.tmp / name
    pq.write_table(pa.table(rows), path)
    return str(path)


def _dataset(path: str, **data: Any) -> Any:
    from diffalign.config import DataConfig
    from diffalign.data.pairs import PairDataset

    return PairDataset(DataConfig(path=path, resolution=32, **data), verbose=False)


def _jsonl(env: Env, lines: list[str]) -> str:
    folder = env.tmp / "jl"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(4)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(folder / name)
    return env.file("jl/pairs.jsonl", "".join(ln + "\n" for ln in lines))


def _pair_folder(env: Env, chosen_x: bytes | None = None, rejected: bool = True) -> str:
    """``chosen/{x,y}.png`` + ``rejected/{x,y}.png`` with captions; ``chosen_x`` replaces x's bytes."""
    root = env.tmp / "pf"
    rng = np.random.default_rng(5)
    for stem in ("x", "y"):
        for side in ("chosen", "rejected") if rejected else ("chosen",):
            (root / side).mkdir(parents=True, exist_ok=True)
            (root / side / f"{stem}.png").write_bytes(_png((rng.random((32, 32, 3)) * 255).astype(np.uint8)))
        (root / "chosen" / f"{stem}.txt").write_text(f"caption {stem}")
    if chosen_x is not None:
        (root / "chosen" / "x.png").write_bytes(chosen_x)
    return str(root)


def _skipped_first_pair(ds: Any) -> dict[str, Any]:
    """Pair 0 is the bad one: it is replaced by pair 1 and counted."""
    item = ds[(0, 7)]
    assert item["skipped"] == 1, item["skipped"]
    assert item["caption"] == ds.rows[1].caption
    assert item["pixels"].shape == (2, 3, 32, 32) and item["pixels"].abs().max() <= 1
    return item


def _bad_blob_pair(env: Env, blob: bytes) -> Any:
    """A parquet whose first pair's winner is ``blob``; loading pair 0 must skip to pair 1."""
    rng = np.random.default_rng(6)
    good = [_png((rng.random((32, 32, 3)) * 255).astype(np.uint8)) for _ in range(3)]
    path = _pairs_table(env, jpg_0=[blob, good[0]], jpg_1=good[1:], label_0=[1.0, 1.0], label_1=[0.0, 0.0])
    return _skipped_first_pair(_dataset(path))


# ----------------------------------------------------------------------------- images


def _decode(blob: bytes) -> np.ndarray:
    from diffalign.data.media import decode_media

    im = decode_media(blob)
    assert isinstance(im, Image.Image) and im.mode == "RGB", getattr(im, "mode", im)
    return np.asarray(im)


def _save(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_raw(arr: np.ndarray, colour_type: int, trns: bytes | None = None) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): greyscale (0) or RGB (2), with a
    ``tRNS`` colour key when given."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    head = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + (chunk(b"tRNS", trns) if trns is not None else b"")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _grey16() -> np.ndarray:
    """Every high byte 0..255 with a low byte too, the extremes included (a clip at 255 or a wrap shows)."""
    v = (np.arange(256, dtype=np.uint32) << 8) | np.arange(256, dtype=np.uint32)[::-1]
    return v.reshape(16, 16).astype(np.uint16)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + 255 * (1 - a)


def _img_png16_grey(env: Env) -> None:
    arr = _grey16()
    got = _decode(_png_raw(arr, 0))
    want = (arr >> 8).astype(np.uint8)
    assert np.array_equal(got, np.repeat(want[..., None], 3, -1))
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) == 256  # full range, no clip/wrap


def _img_png16_rgb(env: Env) -> None:
    arr = (np.random.default_rng(7).random((8, 8, 3)) * 65536).astype(np.uint16)
    arr[0, 0] = [65535, 0, 256]
    got = _decode(_png_raw(arr, 2))
    assert np.array_equal(got, (arr >> 8).astype(np.uint8)) and got[0, 0].tolist() == [255, 0, 1]


def _img_palette_transparency(env: Env) -> None:
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    alpha = np.array([0, 128, 255, 255], np.uint8)  # tRNS: fully, half and not transparent
    idx = np.arange(16, dtype=np.uint8).reshape(4, 4) % 4
    im = Image.fromarray(idx, mode="P")
    im.putpalette(palette.ravel().tolist())
    blob = _save(im, transparency=alpha.tobytes())
    assert Image.open(io.BytesIO(blob)).mode == "P"
    want = _over_white(palette[idx], alpha[idx])
    got = _decode(blob)
    assert np.abs(got - want).max() <= 1, (got[0], want[0])
    assert got[0, 0].tolist() == [255, 255, 255]  # the fully transparent red is white, not red


def _img_rgb_colour_key(env: Env) -> None:
    """An 8-bit RGB PNG with a tRNS colour key: the key's pixels (and only they) are white."""
    rgb = (np.random.default_rng(11).random((8, 8, 3)) * 255).astype(np.uint8)
    key = (10, 200, 30)
    rgb[0, 0], rgb[2, 5], rgb[4, 4] = key, key, (10, 200, 31)  # two keyed, one a near miss
    blob = _save(Image.fromarray(rgb), transparency=key)
    opened = Image.open(io.BytesIO(blob))
    assert opened.mode == "RGB" and opened.info["transparency"] == key
    want = np.where((rgb == key).all(-1, keepdims=True), 255, rgb)
    got = _decode(blob)
    assert np.array_equal(got, want) and got[4, 4].tolist() == [10, 200, 31]


def _img_png16_grey_colour_key(env: Env) -> None:
    """A 16-bit grey PNG with a colour key: matched at full depth (not by the high byte), then white."""
    arr = _grey16()
    key = int(arr[3, 5])
    arr[3, 6] = key ^ 1  # same high byte, other low byte: not transparent
    arr[9, 1] = key
    blob = _png_raw(arr, 0, trns=struct.pack(">H", key))
    assert Image.open(io.BytesIO(blob)).info["transparency"] == key
    want = np.where(arr == key, 255, arr >> 8).astype(np.uint8)
    got = _decode(blob)
    assert np.array_equal(got, np.repeat(want[..., None], 3, -1))
    assert got[3, 5].tolist() == [255] * 3 and got[3, 6].tolist() == [key >> 8] * 3


def _img_png16_rgb_unused_colour_key(env: Env) -> None:
    """16-bit RGB with a key no pixel can have (none has its high bytes): decoded whole, nothing keyed,
    though Pillow's 8-bit reduction would have matched the key (1, 1, 1) to the pixels 0x0100."""
    arr = (np.random.default_rng(12).random((8, 8, 3)) * 65536).astype(np.uint16)
    arr[:2] = 0x0100
    got = _decode(_png_raw(arr, 2, trns=struct.pack(">HHH", 1, 1, 1)))
    assert np.array_equal(got, (arr >> 8).astype(np.uint8)) and got[0, 0].tolist() == [1, 1, 1]


def _png16_rgb_colour_key() -> bytes:
    """16-bit RGB whose pixels have the key's high bytes: Pillow keeps only those, so which pixels are
    keyed cannot be told; a counted skip, not a guess."""
    arr = np.full((8, 8, 3), 0x0102, np.uint16)
    arr[0, 0] = 0x0101  # the keyed pixel; the others differ from it only in the low byte
    return _png_raw(arr, 2, trns=struct.pack(">HHH", 0x0101, 0x0101, 0x0101))


def _img_la(env: Env) -> None:
    rng = np.random.default_rng(8)
    grey, alpha = (rng.random((2, 8, 8)) * 255).astype(np.uint8)
    blob = _save(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]))
    want = _over_white(np.repeat(grey[..., None], 3, -1), alpha)
    assert np.abs(_decode(blob) - want).max() <= 1


def _img_rgba(env: Env) -> None:
    rng = np.random.default_rng(9)
    rgba = (rng.random((8, 8, 4)) * 255).astype(np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    got = _decode(_save(Image.fromarray(rgba, "RGBA")))
    assert np.abs(got - _over_white(rgba[..., :3], rgba[..., 3])).max() <= 1
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == rgba[0, 1, :3].tolist()


def _img_cmyk_jpeg(env: Env) -> None:
    cmyk = np.array([[0, 255, 255, 0], [50, 100, 150, 60], [0, 0, 0, 255], [0, 0, 0, 0]], np.uint8)
    im = Image.fromarray(np.repeat(np.repeat(cmyk[None], 16, 0), 16, 1).reshape(16, 64, 4), "CMYK")
    blob = _save(im, "JPEG", quality=100)
    assert Image.open(io.BytesIO(blob)).mode == "CMYK"
    got = _decode(blob)[8, 8::16]  # the middle of each flat block
    c, k = cmyk[:, :3].astype(np.float64), cmyk[:, 3:].astype(np.float64)
    want = (255 - c) * (255 - k) / 255
    assert np.abs(got - want).max() <= 4, (got, want)


def _img_one_bit(env: Env) -> None:
    bits = (np.indices((8, 8)).sum(0) % 2).astype(bool)
    blob = _save(Image.fromarray(bits))
    assert Image.open(io.BytesIO(blob)).mode == "1"
    assert np.array_equal(_decode(blob), np.repeat((bits * 255).astype(np.uint8)[..., None], 3, -1))


def _img_greyscale(env: Env) -> None:
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    assert np.array_equal(_decode(_save(Image.fromarray(grey))), np.repeat(grey[..., None], 3, -1))


def _img_exif_rotated_jpeg(env: Env) -> None:
    """Orientation 6 (the camera held 90 degrees clockwise): shown rotated, as a viewer shows it."""
    arr = np.zeros((32, 64, 3), np.uint8)  # wide: red left half, blue right half
    arr[:, :32] = [255, 0, 0]
    arr[:, 32:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6
    got = _decode(_save(Image.fromarray(arr), "JPEG", quality=100, exif=exif))
    want = np.rot90(arr, k=-1)  # clockwise, independently of Pillow
    assert got.shape == want.shape == (64, 32, 3)
    assert np.abs(got.astype(int) - want)[4:-4:8, 4:-4:8].max() <= 8  # block interiors (JPEG edges blur)


def _img_huge_legal(env: Env) -> None:
    """25 Mpx (under Pillow's bomb limit): decoded and downscaled to the training size, colour kept."""
    import torch

    from diffalign.data.media import decode_media, media_tensors

    blob = _save(Image.new("RGB", (5000, 5000), (200, 40, 90)))
    win = decode_media(blob)
    lose = decode_media(_save(Image.new("RGB", (64, 64), (0, 0, 0))))
    x, micro = media_tensors([win, lose], 32, True, False, torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 32, 32) and micro[:2].tolist() == [5000, 5000]
    want = torch.tensor([200, 40, 90]) / 127.5 - 1
    assert torch.allclose(x[0].mean((1, 2)), want, atol=1e-5) and torch.allclose(
        x[0, :, 7, 9], want, atol=1e-5
    )


def _img_png16_in_pair(env: Env) -> None:
    """End to end: a 16-bit PNG in a pair parquet reaches the training tensor with its full range."""
    arr = np.kron(_grey16(), np.ones((2, 2), np.uint16))  # 32 x 32
    loser = _png(np.zeros((32, 32, 3), np.uint8))
    path = _pairs_table(env, jpg_0=[_png_raw(arr, 0)] * 2, jpg_1=[loser] * 2, label_0=[1.0, 1.0])
    item = _dataset(path, center_crop=True)[(0, 1)]
    want = np.repeat(((arr >> 8).astype(np.float32) / 127.5 - 1)[None], 3, 0)
    assert item["skipped"] == 0 and np.allclose(item["pixels"][0].numpy(), want, atol=1e-6)
    assert item["pixels"][0].max() == 1 and item["pixels"][0].min() == -1


def _truncated_png() -> bytes:
    blob = _png((np.random.default_rng(10).random((64, 64, 3)) * 255).astype(np.uint8))
    return blob[: len(blob) // 2]


def _wav_8bit() -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(bytes(range(256)))
    return buf.getvalue()


def _float_tiff() -> bytes:
    return _save(Image.fromarray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8), "F"), "TIFF")


def _bad_film_strip() -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("frames", "3")  # 32 px wide does not split into 3 frames
    return _save(Image.new("RGB", (32, 16)), pnginfo=info)


# ----------------------------------------------------------------------------- checks


def _no_folder(name: str) -> Callable[[Env, Outcome], None]:
    def check(env: Env, res: Outcome) -> None:
        assert not (env.tmp / name).exists(), f"{name} was created before the error"

    return check


def _summary_has(*parts: str) -> Callable[[Env, Outcome], None]:
    def check(env: Env, res: Outcome) -> None:
        for p in parts:
            assert p in res.value.summary, res.value.summary

    return check


def _null_caption_is_skipped(env: Env, res: Outcome) -> None:
    ds = res.value
    assert len(ds) == 1 and ds.rows[0].caption == "a blue square", ds.rows
    assert "1 pairs kept" in ds.summary and "skipped 1 empty captions" in ds.summary, ds.summary


def _missing_image_file_is_skipped(env: Env, res: Outcome) -> None:
    _skipped_first_pair(res.value)


def _fresh_run_from_step_0(env: Env, res: Outcome) -> None:
    ckpts = sorted(p.name for p in (env.tmp / "run" / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000001"], ckpts
    steps = [json.loads(ln)["step"] for ln in (env.tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[0] == 1, steps


def _rerun_after_failed_start(env: Env, res: Outcome) -> None:
    _fresh_run_from_step_0(env, res)
    assert env.pairs in (env.tmp / "run" / "config.yaml").read_text()


def _label_skip(n_rows: int, bad_row: int) -> Callable[[Env, Outcome], None]:
    def check(env: Env, res: Outcome) -> None:
        assert f"{n_rows - 1} pairs scored, 1 skipped" in res.out, res.out[-2000:]
        assert f"row {bad_row}" in res.out
        t = pq.read_table(env.tmp / "labelled.parquet").to_pylist()
        src = pq.read_table(env.tmp / "src.parquet").to_pylist()
        assert [r["caption"] for r in t] == [r["caption"] for i, r in enumerate(src) if i != bad_row]
        assert all(np.isfinite(r["score_0.pickscore"]) and r["ai_label_0"] in (0.0, 0.5, 1.0) for r in t)
        assert not list(env.tmp.glob("*.tmp"))

    return check


def _label_src(env: Env, **kw: Any) -> str:
    return str(make_pairs_parquet(env.tmp / "src.parquet", n=4, **kw))


def _label(env: Env, src: str, *extra: str, out: str | None = None) -> list[str]:
    out = out or str(env.tmp / "labelled.parquet")
    return ["label", src, out, "--reward", f"pickscore={env.clip}", "--resize", "30", *extra]


def _label_null_caption(env: Env) -> list[str]:
    src = _label_src(env)
    t = pq.read_table(src)
    caps = t.column("caption").to_pylist()
    caps[2] = None
    pq.write_table(t.set_column(0, "caption", pa.array(caps, pa.string())), src)
    return _label(env, src)


def _eval(env: Env, *extra: str, model: str | None = None) -> list[str]:
    return ["eval", "--model", model or env.sd, "--out", str(env.tmp / "ev"), "--no-report", *extra]


def _toy_eval(env: Env, *extra: str) -> list[str]:
    return ["toy", "eval", env.sd, *extra]


def _demo(env: Env, *extra: str) -> list[str]:
    return ["demo", "--out", str(env.tmp / "demo"), *extra]


# ----------------------------------------------------------------------------- the corpus

PAIRS_FILE = "diffalign/data/pairs.py"

CASES: list[Case] = [
    # -- configs and overrides (validate: nothing loads)
    Case(
        "config_top_level_list",
        "error",
        cli=lambda e: ["validate", _yaml(e, "- a\n- b\n")],
        needle="top level must be a mapping",
    ),
    Case(
        "config_unknown_section",
        "error",
        cli=lambda e: ["validate", _yaml(e, "modle:\n  path: x\n")],
        needle=("unknown config key 'modle'", "Did you mean 'model'"),
    ),
    Case(
        "config_section_not_a_mapping",
        "error",
        cli=lambda e: ["validate", _yaml(e, "train: 5\n")],
        needle="train: expected a mapping, got 5",
    ),
    Case(
        "config_int_given_a_word",
        "error",
        cli=lambda e: ["validate", _yaml(e, "train:\n  batch_size: four\n")],
        needle="train.batch_size: expected an integer, got 'four'",
    ),
    Case(
        "config_int_given_a_fraction",
        "error",
        cli=lambda e: _validate(e, "train.max_steps=1.5"),
        needle="train.max_steps: expected an integer, got 1.5",
    ),
    Case(
        "config_literal_not_a_choice",
        "error",
        cli=lambda e: _validate(e, "train.lr_scheduler=cosin"),
        needle=("train.lr_scheduler: 'cosin' is not a valid choice", "cosine"),
    ),
    Case(
        "config_negative_batch_size",
        "error",
        cli=lambda e: _validate(e, "train.batch_size=-2"),
        needle="train.batch_size: must be >= 1, got -2",
    ),
    Case(
        "config_override_without_value",
        "error",
        cli=lambda e: _validate(e, "train.lr"),
        needle="must look like key=value",
    ),
    Case(
        "config_override_below_a_scalar",
        "error",
        cli=lambda e: _validate(e, "train.lr.x=3"),
        needle="train.lr: expected a number",
    ),
    Case(
        "config_unknown_objective_parameter",
        "error",
        cli=lambda e: _validate(e, "objective.bta=5"),
        needle=("has no hyperparameter 'bta'", "Did you mean 'beta'"),
    ),
    Case(
        "config_resolution_not_multiple_of_8",
        "error",
        cli=lambda e: _validate(e, "data.resolution=30"),
        needle="data.resolution: must be a multiple of 8",
    ),
    Case(
        "config_empty_file", "error", cli=lambda e: ["validate", _yaml(e, "")], needle="model.path is empty"
    ),
    # -- online RL options: zero-advantage groups, the reward process
    Case(
        "config_drop_zero_advantage_not_a_bool",
        "error",
        cli=lambda e: _validate(e, "objective.name=flow_grpo", "objective.drop_zero_advantage=maybe"),
        needle="objective.drop_zero_advantage: expected true/false, got 'maybe'",
    ),
    Case(
        "config_drop_zero_advantage_for_diffusion_nft",
        "error",
        cli=lambda e: _validate(e, "objective.name=diffusion_nft", "objective.drop_zero_advantage=true"),
        needle="objective 'diffusion_nft' has no hyperparameter 'drop_zero_advantage'",
    ),
    Case(
        "config_reward_process_not_a_bool",
        "error",
        cli=lambda e: _validate(e, "train.reward_process=2"),
        needle="train.reward_process: expected true/false, got 2",
    ),
    Case(
        "config_reward_process_without_rewards",
        "error",
        cli=lambda e: _validate(e, "train.reward_process=true"),
        needle=("train.reward_process: objective 'diffusion_dpo' scores no rewards", "reward_process=false"),
    ),
    Case(
        "config_reward_timeout_zero",
        "error",
        cli=lambda e: _validate(e, "train.reward_timeout=0"),
        needle="train.reward_timeout: must be > 0 seconds, got 0",
    ),
    Case(
        "train_reward_process_cannot_load_its_reward",
        "error",
        cli=lambda e: _train(
            e,
            f"data.path={_prompts(e)}",
            "objective.name=grpo",
            f"objective.rewards=clip_score={e.tmp / 'missing'}",
            "objective.sample_steps=2",
            "objective.group_size=2",
            "train.reward_process=true",
        ),
        needle=("reward process: could not load clip_score", "missing' does not exist"),
    ),
    # -- cache: its option errors (caches and shards themselves are tested with their code)
    Case(
        "cache_without_cache_dir",
        "error",
        cli=lambda e: ["cache", *_validate(e, "data.cache_dir=null")[1:]],
        needle="data.cache_dir is not set",
    ),
    Case(
        "cache_with_random_flip",
        "error",
        cli=lambda e: ["cache", *_validate(e, f"data.cache_dir={e.tmp / 'c'}", "data.random_flip=true")[1:]],
        needle="cannot flip cached latents",
        check=_no_folder("c"),
    ),
    # -- data files
    Case(
        "parquet_zero_bytes",
        "error",
        cli=lambda e: _validate(e, f"data.path={e.file('z.parquet', b'')}"),
        needle=("z.parquet", "not a readable parquet file"),
    ),
    Case(
        "parquet_zero_rows",
        "error",
        call=lambda e: _dataset(
            _pairs_table(
                e,
                **{k: [] for k in ("caption", "jpg_0", "jpg_1")},
                label_0=pa.array([], pa.float64()),
                label_1=[],
            )
        ),
        needle="no usable pairs",
    ),
    Case(
        "parquet_missing_image_column",
        "error",
        cli=lambda e: _validate(e, f"data.path={_pairs_table(e, jpg_1=None)}"),
        needle=("missing column 'jpg_1'", "p.parquet"),
    ),
    Case(
        "data_path_unknown_suffix",
        "error",
        cli=lambda e: _validate(e, f"data.path={e.file('d.csv', 'a,b')}"),
        needle="unknown file type '.csv'",
    ),
    Case(
        "label_0_a_word",
        "error",
        call=lambda e: _dataset(_pairs_table(e, label_0=["yes", "no"])),
        needle=("p.parquet row 0", "label_0='yes' is not one of 0, 0.5, 1"),
    ),
    Case(
        "label_0_nan",
        "error",
        call=lambda e: _dataset(_pairs_table(e, label_0=[1.0, float("nan")])),
        needle=("p.parquet row 1", "label_0=nan"),
    ),
    Case(
        "caption_null_in_a_row",
        "skip",
        call=lambda e: _dataset(_pairs_table(e, caption=pa.array([None, "a blue square"], pa.string()))),
        check=_null_caption_is_skipped,
    ),
    Case(
        "caption_column_of_numbers",
        "error",
        call=lambda e: _dataset(_pairs_table(e, caption=[1, 2])),
        needle=("no usable pairs", "skipped 2 empty captions"),
    ),
    Case(
        "score_column_absent",
        "error",
        call=lambda e: _dataset(_pairs_table(e), score_column="pick"),
        needle="data.score_column='pick' needs columns",
    ),
    Case(
        "jsonl_row_is_an_array",
        "error",
        call=lambda e: _dataset(_jsonl(e, ['["a caption", "a.png", "b.png"]'])),
        needle=("pairs.jsonl line 1",),
    ),
    Case(
        "jsonl_missing_keys",
        "error",
        cli=lambda e: _train(e, f"data.path={_jsonl(e, [json.dumps({'caption': 'a', 'chosen': 'a.png'})])}"),
        needle=("pairs.jsonl line 1", "needs keys caption + chosen + rejected"),
    ),
    Case(
        "jsonl_null_image_path",
        "error",
        call=lambda e: _dataset(
            _jsonl(e, [json.dumps({"caption": "a", "chosen": None, "rejected": "b.png"})])
        ),
        needle=("line 1 key 'chosen'", "expected an image path"),
    ),
    Case("jsonl_empty_file", "error", call=lambda e: _dataset(_jsonl(e, [])), needle="no usable pairs"),
    Case(
        "jsonl_image_file_missing",
        "skip",
        call=lambda e: _dataset(
            _jsonl(
                e,
                [
                    json.dumps({"caption": "a", "chosen": "gone.png", "rejected": "b.png"}),
                    json.dumps({"caption": "b", "chosen": "a.png", "rejected": "b.png"}),
                ],
            )
        ),
        check=_missing_image_file_is_skipped,
    ),
    Case(
        "folder_chosen_without_rejected",
        "error",
        call=lambda e: _dataset(_pair_folder(e, rejected=False)),
        needle="no chosen/ + rejected/ subfolders",
    ),
    Case(
        "folder_chosen_image_without_its_rejected",
        "error",
        call=lambda e: (Path(_pair_folder(e)) / "rejected" / "x.png").unlink() or _dataset(str(e.tmp / "pf")),
        needle="no matching rejected/x.*",
    ),
    Case(
        "folder_caption_not_utf8",
        "error",
        call=lambda e: (
            (Path(_pair_folder(e)) / "chosen" / "x.txt").write_bytes(b"caf\xe9")
            and _dataset(str(e.tmp / "pf"))
        ),
        needle=("x.txt", "UTF-8"),
    ),
    # -- images: every mode and bit depth decodes to 8-bit RGB with its full range
    Case("image_png_16bit_grey", "ok", call=_img_png16_grey),
    Case("image_png_16bit_rgb", "ok", call=_img_png16_rgb),
    Case("image_palette_with_transparency", "ok", call=_img_palette_transparency),
    Case("image_rgb_png_colour_key", "ok", call=_img_rgb_colour_key),
    Case("image_png_16bit_grey_colour_key", "ok", call=_img_png16_grey_colour_key),
    Case("image_png_16bit_rgb_unused_colour_key", "ok", call=_img_png16_rgb_unused_colour_key),
    Case("image_la_grey_alpha", "ok", call=_img_la),
    Case("image_rgba", "ok", call=_img_rgba),
    Case("image_cmyk_jpeg", "ok", call=_img_cmyk_jpeg),
    Case("image_one_bit", "ok", call=_img_one_bit),
    Case("image_greyscale", "ok", call=_img_greyscale),
    Case("image_exif_rotated_jpeg", "ok", call=_img_exif_rotated_jpeg),
    Case("image_huge_but_legal_downscaled", "ok", call=_img_huge_legal),
    Case("image_png_16bit_through_a_pair", "ok", call=_img_png16_in_pair),
    Case("image_zero_byte_file", "skip", call=lambda e: _skipped_first_pair(_dataset(_pair_folder(e, b"")))),
    Case(
        "image_text_renamed_png",
        "skip",
        call=lambda e: _skipped_first_pair(_dataset(_pair_folder(e, b"caption: not really a picture\n"))),
    ),
    Case("image_truncated_png", "skip", call=lambda e: _bad_blob_pair(e, _truncated_png())),
    Case("image_wav_8bit", "skip", call=lambda e: _bad_blob_pair(e, _wav_8bit())),
    Case("image_float32_tiff", "skip", call=lambda e: _bad_blob_pair(e, _float_tiff())),
    Case("image_png_16bit_rgb_colour_key", "skip", call=lambda e: _bad_blob_pair(e, _png16_rgb_colour_key())),
    Case("image_film_strip_bad_frame_count", "skip", call=lambda e: _bad_blob_pair(e, _bad_film_strip())),
    # -- run folders
    Case(
        "resume_with_no_checkpoint",
        "ok",
        cli=lambda e: [*_train(e), "--resume"],
        check=_fresh_run_from_step_0,
    ),
    Case(
        "resume_path_not_a_checkpoint",
        "error",
        cli=lambda e: [*_train(e), "--resume", str(e.tmp)],
        needle="not a diffalign checkpoint folder (no state.json)",
    ),
    Case(
        "resume_path_is_a_file",
        "error",
        cli=lambda e: [*_train(e), "--resume", e.file("ck.pt", b"\0")],
        needle=("ck.pt", "not a diffalign checkpoint folder"),
    ),
    Case(
        "model_folder_not_a_pipeline",
        "error",
        cli=lambda e: _train(e, f"model.path={e.file('m/readme.txt', 'x') and e.tmp / 'm'}"),
        needle="has no model_index.json: not a diffusers pipeline folder",
    ),
    Case(
        "run_folder_of_a_failed_start",
        "ok",
        cli=lambda e: (_run_cli(_train(e, f"data.path={_jsonl(e, ['{}'])}")), _train(e))[1],
        check=_rerun_after_failed_start,
    ),
    # -- diffalign eval
    Case(
        "eval_n_prompts_zero",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--n-prompts", "0"),
        needle="--n-prompts: must be an integer >= 1",
        check=_no_folder("ev"),
    ),
    Case(
        "eval_n_prompts_negative",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--n-prompts", "-3"),
        needle=("--n-prompts: must be an integer >= 1", "got -3"),
    ),
    Case(
        "eval_per_prompt_zero",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--per-prompt", "0"),
        needle="--per-prompt: must be an integer >= 1",
    ),
    Case(
        "eval_guidance_nan",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--guidance", "nan"),
        needle="--guidance: must be a finite number",
        check=_no_folder("ev"),
    ),
    Case(
        "eval_steps_zero",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--steps", "0"),
        needle="--steps: must be an integer >= 1",
    ),
    Case(
        "eval_size_not_multiple_of_8",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--size", "20"),
        needle="--size: must be a multiple of 8",
    ),
    Case(
        "eval_threshold_above_one",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--threshold", "1.5"),
        needle="--threshold: must be a finite number in [0, 1]",
    ),
    Case(
        "eval_negative_seed",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--seed", "-1"),
        needle="--seed: must be an integer >= 0",
    ),
    Case(
        "eval_batch_zero",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", "--batch", "0"),
        needle="--batch: must be an integer >= 1",
    ),
    Case(
        "eval_metadata_bad_row",
        "error",
        cli=lambda e: _eval(
            e,
            "--metadata",
            e.file(
                "md.jsonl",
                json.dumps(
                    {
                        "tag": "single_object",
                        "prompt": "a photo of a cat",
                        "include": [{"class": "cat", "count": 1}],
                    }
                )
                + "\n"
                + json.dumps(
                    {"tag": "counting", "prompt": "cats", "include": [{"class": "cat", "count": 0}]}
                ),
            ),
        ),
        needle=("md.jsonl:2", "needs an integer 'count' >= 1"),
        check=_no_folder("ev"),
    ),
    Case(
        "eval_metadata_row_is_an_array",
        "error",
        cli=lambda e: _eval(e, "--metadata", e.file("md.jsonl", '["single_object", "a cat"]\n')),
        needle=("md.jsonl:1", "expected a JSON object"),
    ),
    Case(
        "eval_prompts_file_empty",
        "error",
        cli=lambda e: _eval(e, "--prompts", e.file("p.txt", "\n\n")),
        needle="has no prompts",
    ),
    Case(
        "eval_prompts_file_binary",
        "error",
        cli=lambda e: _eval(e, "--prompts", e.file("p.txt", bytes(range(256)) * 4)),
        needle=("p.txt:1", "binary file"),
    ),
    Case(
        "eval_prompts_file_not_utf8",
        "error",
        cli=lambda e: _eval(e, "--prompts", e.file("p.txt", "a cat\na caf\xe9\n".encode("latin-1"))),
        needle=("p.txt:2", "not UTF-8"),
    ),
    Case(
        "eval_model_missing",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", model=str(e.tmp / "no-model")),
        needle=("--model", "no-model' does not exist"),
        check=_no_folder("ev"),
    ),
    Case(
        "eval_model_folder_not_a_pipeline",
        "error",
        cli=lambda e: _eval(e, "--toy", "heldout", model=str(Path(e.file("m/x.txt", "x")).parent)),
        needle="neither a diffusers pipeline folder",
    ),
    Case(
        "eval_out_is_a_file",
        "error",
        cli=lambda e: [*_eval(e, "--toy", "heldout")[:3], "--out", e.file("taken", "x"), "--toy", "heldout"],
        needle=("taken", "is a file, not a folder"),
    ),
    # -- diffalign demo: every option checked before any work
    Case(
        "demo_steps_zero",
        "error",
        cli=lambda e: _demo(e, "--steps", "0"),
        needle="demo --steps (train.max_steps): must be an integer >= 1",
        check=_no_folder("demo"),
    ),
    Case(
        "demo_eval_prompts_zero",
        "error",
        cli=lambda e: _demo(e, "--eval-prompts", "0"),
        needle="demo --eval-prompts: must be an integer >= 1",
        check=_no_folder("demo"),
    ),
    Case(
        "demo_unknown_objective",
        "error",
        cli=lambda e: _demo(e, "--objective", "dpo"),
        needle=("demo --objective 'dpo'", "Did you mean"),
    ),
    Case(
        "demo_negative_beta_even_for_sft",
        "error",
        cli=lambda e: _demo(e, "--objective", "sft", "--beta", "-1"),
        needle="demo --beta (objective.beta): must be a finite number > 0",
        check=_no_folder("demo"),
    ),
    Case(
        "demo_lr_nan",
        "error",
        cli=lambda e: _demo(e, "--lr", "nan"),
        needle="demo --lr (train.lr): must be a finite",
    ),
    Case(
        "demo_synpic_guidance_inf",
        "error",
        cli=lambda e: _demo(e, "--synpic-guidance", "4", "inf", "1"),
        needle="demo --synpic-guidance",
    ),
    Case(
        "demo_out_is_a_file",
        "error",
        cli=lambda e: ["demo", "--out", e.file("taken", "x"), "--steps", "1"],
        needle=("taken", "is a file"),
    ),
    # -- diffalign toy
    Case(
        "toy_eval_missing_folder",
        "error",
        cli=lambda e: ["toy", "eval", str(e.tmp / "nothing")],
        needle=("toy eval", "nothing' does not exist"),
    ),
    Case(
        "toy_eval_zero_prompts",
        "error",
        cli=lambda e: _toy_eval(e, "--prompts", "0"),
        needle="toy eval --prompts: must be an integer >= 1",
    ),
    Case(
        "toy_eval_steps_zero",
        "error",
        cli=lambda e: _toy_eval(e, "--steps", "0"),
        needle="toy eval --steps: must be an integer >= 1",
    ),
    Case(
        "toy_pretrain_minutes_nan",
        "error",
        cli=lambda e: ["toy", "pretrain", "--minutes", "1", "nan", "1", "--work", str(e.tmp / "w")],
        needle="toy pretrain --minutes/--av-minutes: must be finite and > 0",
        check=_no_folder("w"),
    ),
    # -- diffalign label
    Case(
        "label_missing_column",
        "error",
        cli=lambda e: _label(e, _label_src(e, drop_columns=("jpg_1",))),
        needle=("src.parquet", "missing column 'jpg_1'"),
    ),
    Case(
        "label_corrupt_image_in_a_row",
        "skip",
        cli=lambda e: _label(e, _label_src(e, corrupt_rows=(1,))),
        check=_label_skip(4, 1),
    ),
    Case("label_null_caption_in_a_row", "skip", cli=_label_null_caption, check=_label_skip(4, 2)),
    Case(
        "label_output_folder_missing",
        "error",
        cli=lambda e: _label(e, _label_src(e), out=str(e.tmp / "nodir" / "o.parquet")),
        needle=("nodir", "does not exist"),
    ),
    Case(
        "label_resize_zero",
        "error",
        cli=lambda e: [*_label(e, _label_src(e)), "--resize", "0"],
        needle="label --resize: must be >= 1",
    ),
    Case(
        "label_no_scorable_row",
        "error",
        cli=lambda e: _label(e, _label_src(e, corrupt_rows=(0, 1, 2, 3))),
        needle=("src.parquet has no pair to score", "4 rows"),
        check=_no_folder("labelled.parquet"),
    ),
    Case(
        "label_unknown_reward",
        "error",
        cli=lambda e: ["label", _label_src(e), str(e.tmp / "o.parquet"), "--reward", "pickscor"],
        needle=("unknown reward 'pickscor'", "Did you mean 'pickscore'"),
    ),
    Case(
        "label_model_free_reward_given_a_path",
        "error",
        cli=lambda e: [
            "label",
            _label_src(e),
            str(e.tmp / "o.parquet"),
            "--reward",
            f"jpeg_compressibility={e.tmp}",
        ],
        needle=("jpeg_compressibility measures JPEG file sizes and loads no model", "'jpeg_compressibility'"),
    ),
]


def _params() -> list[Any]:
    out = []
    for c in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


def test_corpus_is_broad_and_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30
    assert {c.expect for c in CASES} == {"error", "skip", "ok"}
    for c in CASES:
        assert (c.cli is None) != (c.call is None), c.id
        assert c.expect != "error" or c.needle, c.id


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: Case, tmp_path: Path, shared: dict[str, Path]):
    env = Env(tmp_path, shared)
    if case.cli is not None:
        args = case.cli(env)
        res = _run_cli(args)
    else:
        res = _run_call(lambda: case.call(env))
    _assert_outcome(case, env, res)
