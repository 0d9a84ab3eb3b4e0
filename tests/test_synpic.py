"""Syn-Pic on tiny pipelines: ranked shards, determinism, crash-resume equality, pair export, bad input."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch

from diffalign.config import ConfigError
from diffalign.synpic import SynPicConfig, export_pairs, read_prompts, run_synpic

from conftest import accelerate_launch

PROMPTS = [
    f"a photo of {n} {c} {s}"
    for n in ("two", "three")
    for c in ("red", "blue")
    for s in ("circles", "squares")
]


def cfg_for(tmp_path, tiny_models, tiny_clip, out="out", **kw) -> SynPicConfig:
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(PROMPTS))
    return SynPicConfig(
        prompts=str(pf),
        generators=[str(tiny_models["sd"]), str(tiny_models["sd3"])],
        rewards=[f"pickscore={tiny_clip}", f"clip_score={tiny_clip}"],
        out=str(tmp_path / out),
        images_per_generator=2,
        steps=2,
        shard_size=3,
        batch_prompts=2,
        **kw,
    )


def table(out) -> list[dict]:
    rows = []
    for f in sorted(out.glob("shard-*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def test_synpic_ranked_shards_and_pairs(tmp_path, tiny_models, tiny_clip):
    out = run_synpic(cfg_for(tmp_path, tiny_models, tiny_clip))
    rows = table(out)
    assert [r["prompt"] for r in rows] == PROMPTS and len(list(out.glob("shard-*.parquet"))) == 3
    r = rows[0]
    assert len(r["images"]) == 4 and sorted(r["rank"]) == [1, 2, 3, 4]
    assert all(0 <= p <= 1 for p in r["phi"]) and len(r["scores.pickscore"]) == 4
    assert r["generator"] == [str(tiny_models["sd"])] * 2 + [str(tiny_models["sd3"])] * 2
    assert (out / "manifest.json").exists()
    # phi is the vote over the stored scores (equal weights unless reward_weights says otherwise)
    from diffalign.rewards.ensemble import vote_phi

    scores = {n: torch.tensor([x[f"scores.{n}"] for x in rows]) for n in ("pickscore", "clip_score")}
    assert torch.allclose(torch.tensor([x["phi"] for x in rows]), vote_phi(scores))
    pairs = pq.read_table(export_pairs(out, tmp_path / "pairs.parquet")).to_pylist()
    assert 0 < len(pairs) <= len(PROMPTS) and all(p["label_0"] == 1.0 for p in pairs)
    # the pairs train directly: they follow the Pick-a-Pic schema
    from diffalign.config import DataConfig
    from diffalign.data import PairDataset

    assert len(PairDataset(DataConfig(path=str(tmp_path / "pairs.parquet"), resolution=32))) == len(pairs)


def test_synpic_reward_weights_reach_phi(tmp_path, tiny_models, tiny_clip):
    """Weight 0 on clip_score: the stored phi and ranks follow pickscore alone."""
    from diffalign.rewards.ensemble import ranks_from_phi, vote_phi

    c = cfg_for(tmp_path, tiny_models, tiny_clip, reward_weights=[1.0, 0.0])
    c.generators = c.generators[:1]
    rows = table(run_synpic(c))
    only = vote_phi({"pickscore": torch.tensor([x["scores.pickscore"] for x in rows])})
    assert torch.allclose(torch.tensor([x["phi"] for x in rows]), only)
    assert [x["rank"] for x in rows] == ranks_from_phi(only).tolist()


def test_synpic_killed_three_times_equals_uninterrupted(tmp_path, tiny_models, tiny_clip):
    ref = table(run_synpic(cfg_for(tmp_path, tiny_models, tiny_clip, out="ref")))
    c = cfg_for(tmp_path, tiny_models, tiny_clip, out="cut")
    args = [sys.executable, *synpic_args(c)]
    out = tmp_path / "cut"
    for kill in range(3):
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        have = len(list(out.glob("shard-*.parquet")))
        deadline = time.time() + 120
        while (
            time.time() < deadline and len(list(out.glob("shard-*.parquet"))) <= have and proc.poll() is None
        ):
            time.sleep(0.05)
        time.sleep(0.1 * kill)  # land somewhere inside the next shard
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(out.glob("*.tmp"))
    assert table(out) == ref  # same rows, same image bytes


def test_synpic_bad_input(tmp_path, tiny_models, tiny_clip):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "dup.txt").write_text("a red circle\na blue square\na red circle\n")
    with pytest.raises(
        ConfigError, match=r"dup.txt line 3: duplicate prompt 'a red circle' \(first on line 1\)"
    ):
        read_prompts(str(tmp_path / "dup.txt"))
    assert read_prompts(str(tmp_path / "dup.txt"), dedup=True) == ["a red circle", "a blue square"]
    c = cfg_for(tmp_path, tiny_models, tiny_clip)
    c.reward_weights = [1.0, 2.0, 1.0]  # three weights, two rewards: refused before any model loads
    with pytest.raises(ConfigError, match=r"3 weight\(s\) for 2 reward"):
        run_synpic(c)
    c = cfg_for(tmp_path, tiny_models, tiny_clip)
    c.generators = ["/no/such/pipeline"]
    with pytest.raises(ConfigError, match="does not exist"):
        run_synpic(c)
    (tmp_path / "a-file").write_text("")
    c = cfg_for(
        tmp_path, tiny_models, tiny_clip, out="a-file/out"
    )  # a folder under a file: unwritable even for root
    with pytest.raises(ConfigError, match="is not writable"):
        run_synpic(c)


def test_synpic_failing_writer_leaves_nothing_half_written(tmp_path, tiny_models, tiny_clip):
    def disk_full(table, path):
        with open(path, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError(28, "No space left on device")

    c = cfg_for(tmp_path, tiny_models, tiny_clip, out="full")
    with pytest.raises(ConfigError, match="No space left on device"):
        run_synpic(c, writer=disk_full)
    out = tmp_path / "full"
    assert not list(out.glob("shard-*")) and not list(out.glob("*.tmp"))


def test_label_writes_scores_and_ai_label(tmp_path, tiny_clip):
    from diffalign.label import label_pairs
    from diffalign.rewards import PickScore

    from conftest import make_pairs_parquet

    src = make_pairs_parquet(tmp_path / "p.parquet", n=6)
    out = label_pairs(str(src), [f"pickscore={tiny_clip}"], str(tmp_path / "labelled.parquet"), resize=32)
    t = pq.read_table(out)
    assert t.num_rows == 6 and {
        "score_0.pickscore",
        "score_1.pickscore",
        "ai_label_0",
        "jpg_0",
        "label_0",
    } <= set(t.column_names)
    rows = t.to_pylist()
    assert all(
        r["ai_label_0"] == (1.0 if r["score_0.pickscore"] > r["score_1.pickscore"] else 0.0) for r in rows
    )
    # the scores are the reward's own
    import io

    import numpy as np
    import torch
    from PIL import Image

    im = np.array(Image.open(io.BytesIO(rows[0]["jpg_0"])).convert("RGB").resize((32, 32), Image.BICUBIC))
    s = PickScore(str(tiny_clip))(
        torch.from_numpy(im[None]).permute(0, 3, 1, 2).float() / 255, [rows[0]["caption"]]
    ).scores
    assert s.item() == pytest.approx(rows[0]["score_0.pickscore"], rel=1e-5)


def synpic_args(c: SynPicConfig) -> list[str]:
    args = [
        "-m",
        "diffalign.cli",
        "synpic",
        "--prompts",
        c.prompts,
        "--out",
        c.out,
        "--steps",
        "2",
        "--shard-size",
        "3",
        "--batch-prompts",
        "2",
    ]
    for g in c.generators:
        args += ["--generator", g]
    for r in c.rewards:
        args += ["--reward", r]
    return args


def test_synpic_two_processes_equal_one(tmp_path, tiny_models, tiny_clip):
    """accelerate launch with 2 processes: each rank takes its shards, the last one to finish
    writes index.json, and the rows equal a single-process run's (same bytes after sorting).
    Both runs use one thread per process: float reductions, hence pixel rounding, depend on the
    thread count, not on the sharding."""
    import json
    import os

    from diffalign.synpic import merge_shards

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = cfg_for(tmp_path, tiny_models, tiny_clip, out="one")
    proc = subprocess.run(
        [sys.executable, *synpic_args(one)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = cfg_for(tmp_path, tiny_models, tiny_clip, out="two")
    proc = subprocess.run(
        [*accelerate_launch(), *synpic_args(c)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "two"
    key = lambda r: r["prompt_index"]  # noqa: E731
    got, ref = sorted(table(out), key=key), sorted(table(tmp_path / "one"), key=key)
    assert [r["prompt"] for r in got] == PROMPTS and got == ref
    index = json.loads((out / "index.json").read_text())
    assert index["num_rows"] == len(PROMPTS) and len(index["shards"]) == 3
    # the merge refuses an incomplete folder
    (out / "shard-00001.parquet").unlink()
    with pytest.raises(ConfigError, match="1 of 3 shards missing"):
        merge_shards(out)


def test_weights_fingerprint_follows_content_not_location(tmp_path):
    from diffalign.synpic import weights_fingerprint

    a = tmp_path / "a" / "unet"
    a.mkdir(parents=True)
    (a / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 64)  # 16 KiB
    (a / "config.json").write_text("{}")
    b = tmp_path / "b"
    import shutil

    shutil.copytree(tmp_path / "a", b)
    fa = weights_fingerprint(tmp_path / "a", chunks=4, chunk_bytes=256)
    assert fa == weights_fingerprint(b, chunks=4, chunk_bytes=256) != ""
    (b / "unet" / "config.json").write_text('{"x": 1}')  # configs are not weights
    assert weights_fingerprint(b, chunks=4, chunk_bytes=256) == fa
    data = bytearray((b / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
    data[-1] ^= 1  # the last slice always covers the file's end
    (b / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(bytes(data))
    assert weights_fingerprint(b, chunks=4, chunk_bytes=256) != fa
    assert weights_fingerprint("some-org/some-hub-model") == ""


def test_synpic_refuses_to_continue_with_retrained_generator(tmp_path, tiny_models, tiny_clip):
    import shutil

    gen = tmp_path / "gen"
    shutil.copytree(tiny_models["sd"], gen)
    c = cfg_for(tmp_path, tiny_models, tiny_clip)
    c.generators = [str(gen)]
    out = run_synpic(c)
    run_synpic(c)  # same weights: the finished run is reused
    # a moved folder with a moved prompt file resumes: only content and settings must match
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    (tmp_path / "elsewhere.txt").write_text((tmp_path / "prompts.txt").read_text())
    stamps = {f: f.stat().st_mtime_ns for f in moved.glob("shard-*.parquet")}
    run_synpic(SynPicConfig(**{**vars(c), "out": str(moved), "prompts": str(tmp_path / "elsewhere.txt")}))
    assert {f: f.stat().st_mtime_ns for f in moved.glob("shard-*.parquet")} == stamps  # nothing regenerated
    with pytest.raises(ConfigError, match="holds a Syn-Pic run with other settings or prompts"):
        run_synpic(SynPicConfig(**{**vars(c), "out": str(moved), "steps": 3}))
    w = next(gen.rglob("unet/*.safetensors"))
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(
        ConfigError, match=r"generator '.*gen' has other weights than when this Syn-Pic run started"
    ):
        run_synpic(c)


def test_synpic_images_per_generator_can_differ(tmp_path, tiny_models, tiny_clip):
    c = cfg_for(tmp_path, tiny_models, tiny_clip, out="uneven")
    c.images_per_generator = [3, 1]
    rows = table(run_synpic(c))
    sd, sd3 = str(tiny_models["sd"]), str(tiny_models["sd3"])
    assert all(r["generator"] == [sd] * 3 + [sd3] for r in rows) and all(
        sorted(r["rank"]) == [1, 2, 3, 4] for r in rows
    )
    # the sd images equal those of an even run's first three (same per-(prompt, generator, index) seeds)
    even = cfg_for(tmp_path, tiny_models, tiny_clip, out="even")
    even.images_per_generator = 3
    ref = table(run_synpic(even))
    assert [r["images"][:3] for r in rows] == [r["images"][:3] for r in ref]
    assert [r["images"][3] for r in rows] == [r["images"][3] for r in ref]  # sd3's first image
    for bad, msg in (([1, 1, 1], r"one number, or one per generator \(2\)"), ([2, 0], "at least 1 image")):
        c.images_per_generator, c.out = bad, str(tmp_path / "bad")
        with pytest.raises(ConfigError, match=msg):
            run_synpic(c)
    # a guidance scale per generator: the same model listed twice, guided and unguided
    c = cfg_for(tmp_path, tiny_models, tiny_clip, out="twice")
    c.generators, c.images_per_generator, c.guidance = [sd, sd], [2, 1], [5.0, 1.0]
    twice = table(run_synpic(c))
    assert [r["images"][:2] for r in twice] == [r["images"][:2] for r in ref]  # the guided pair: as before
    assert all(r["images"][2] not in r["images"][:2] for r in twice)
    c.guidance, c.out = [5.0, 1.0, 1.0], str(tmp_path / "bad2")
    with pytest.raises(ConfigError, match=r"one scale, or one per generator \(2\)"):
        run_synpic(c)


def test_export_pairs_n_best_against_n_worst(tmp_path, capsys):
    from diffalign.synpic import write_ranked_set

    # hand-made ranked shard: prompt "p" has 5 samples ranked b, d, a, e, c (phi: higher is better,
    # a tie between d and a); prompt "q" has 3 samples, too few for the 2 best vs the 2 worst
    rows = {
        "prompt": ["p", "q"],
        "images": [[b"a", b"b", b"c", b"d", b"e"], [b"x", b"y", b"z"]],
        "phi": [[0.5, 1.0, 0.0, 0.5, 0.25], [1.0, 0.5, 0.0]],
        "rank": [[3, 1, 5, 2, 4], [1, 2, 3]],
        "scores.r": [[0.3, 0.9, 0.1, 0.4, 0.2], [3.0, 2.0, 1.0]],
    }
    ranked = write_ranked_set(tmp_path / "ranked", [rows])  # a checked set: manifest, checksums, index
    got = pq.read_table(export_pairs(ranked, tmp_path / "n2.parquet", "best_worst", 2)).to_pylist()
    assert [(r["jpg_0"], r["jpg_1"]) for r in got] == [(b"b", b"e"), (b"b", b"c"), (b"d", b"e"), (b"d", b"c")]
    assert [(r["score_0.r"], r["score_1.r"]) for r in got][1] == (0.9, 0.1)
    assert "skipped 1 prompt(s) with fewer than 4 ranked samples" in capsys.readouterr().err
    one = pq.read_table(export_pairs(ranked, tmp_path / "n1.parquet")).to_pylist()
    assert [(r["caption"], r["jpg_0"], r["jpg_1"]) for r in one] == [("p", b"b", b"c"), ("q", b"x", b"z")]
    # every pair except the d-a tie
    assert len(pq.read_table(export_pairs(ranked, tmp_path / "all.parquet", "all")).to_pylist()) == 10 - 1 + 3
    with pytest.raises(ConfigError, match="valid choices: best_worst, all"):
        export_pairs(ranked, tmp_path / "x.parquet", "top")
    with pytest.raises(ConfigError, match="n=2"):
        export_pairs(ranked, tmp_path / "x.parquet", "all", 2)
