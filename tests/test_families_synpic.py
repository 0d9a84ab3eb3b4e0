"""Syn-Pic and sampling on the new pipelines: FLUX.1 and Qwen-Image make ranked image sets scored by an
image reward, Wan2.1 makes ranked clip sets scored by the video reward; each sample depends only on its
own seed; Qwen-Image's guidance is its true CFG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny-dit")
    for name in ("flux", "wan", "qwenimage"):
        build_tiny_pipeline(name, root / name)
    return {name: root / name for name in ("flux", "wan", "qwenimage")}


@pytest.mark.parametrize("name", ["flux", "wan", "qwenimage"])
def test_generate_media_shapes_and_per_sample_seeds(models, name):
    from diffalign.models.generate import generate_media, pipeline_modality
    from diffalign.models.loading import load_pipeline

    pipe, call = load_pipeline(models[name])
    assert pipeline_modality(pipe) == ("video" if name == "wan" else "image")
    two = generate_media(pipe, ["a red circle", "a blue square"], 1, [7, 8], 2, 3.0, **call)
    one = generate_media(pipe, ["a blue square"], 1, [8], 2, 3.0, **call)
    shape = (5, 32, 32, 3) if name == "wan" else (32, 32, 3)
    assert [m.shape for m in two] == [shape, shape] and two[0].dtype == np.uint8
    assert np.abs(two[1].astype(int) - one[0].astype(int)).max() <= 1  # its own seed, not the batch's


def test_qwen_guidance_is_true_cfg(models, monkeypatch):
    from diffalign.models.generate import generate_media
    from diffalign.models.loading import load_pipeline

    pipe, call = load_pipeline(models["qwenimage"])
    seen = {}
    real = type(pipe).__call__

    def spy(self, *args, **kw):
        seen.update(kw)
        return real(self, *args, **kw)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    a = generate_media(pipe, ["a red circle"], 1, [3], 2, 4.0, **call)
    assert seen["true_cfg_scale"] == 4.0 and seen["guidance_scale"] is None
    assert seen["negative_prompt"] == [" "]  # true CFG runs only with a negative prompt
    seen.clear()
    b = generate_media(pipe, ["a red circle"], 1, [3], 2, 1.0, **call)
    assert "negative_prompt" not in seen and seen["true_cfg_scale"] == 1.0
    assert not np.array_equal(a[0], b[0])  # the scale acts


def test_synpic_on_flux_and_qwen_images_and_wan_clips(models, tmp_path, tiny_clip):
    import pyarrow.parquet as pq

    from diffalign.data.media import Clip, decode_media
    from diffalign.synpic import SynPicConfig, export_pairs, run_synpic

    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    common = dict(prompts=str(tmp_path / "p.txt"), steps=2, seed=0, shard_size=8, batch_prompts=2)
    out = run_synpic(
        SynPicConfig(
            **common,
            generators=[str(models["flux"]), str(models["qwenimage"])],
            images_per_generator=[2, 1],
            rewards=[f"pickscore={tiny_clip}"],
            out=str(tmp_path / "img"),
        )
    )
    rows = pq.read_table(out / "shard-00000.parquet").to_pylist()
    assert len(rows) == 2 and all(len(r["images"]) == 3 and sorted(r["rank"]) == [1, 2, 3] for r in rows)
    assert np.asarray(decode_media(rows[0]["images"][2])).shape == (32, 32, 3)
    assert pq.read_table(export_pairs(out, tmp_path / "pairs.parquet")).num_rows == 2

    out = run_synpic(
        SynPicConfig(
            **common,
            generators=[str(models["wan"])],
            images_per_generator=2,
            rewards=[f"video_clip={tiny_clip}"],
            out=str(tmp_path / "vid"),
        )
    )
    rows = pq.read_table(out / "shard-00000.parquet").to_pylist()
    clip = decode_media(rows[0]["images"][0])
    assert isinstance(clip, Clip) and clip.frames.shape == (5, 32, 32, 3)
    assert len(rows[0]["scores.video_clip"]) == 2
