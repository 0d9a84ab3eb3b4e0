"""ShapesWorld-video: deterministic clips, clean splits, and an exact judge (>= 99% per tag on
ground truth, rejects wrong directions, reversed and frozen clips)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from diffalign.benchmarks.toyworlds import video as V


def test_clips_are_deterministic_and_item_i_does_not_depend_on_n():
    a = list(V.make_dataset(6, 3))
    b = list(V.make_dataset(4, 3))
    for (ca, pa, _), (cb, pb, _) in zip(a, b, strict=False):
        assert pa == pb and np.array_equal(ca, cb)
    clip = a[0][0]
    assert clip.shape == (V.FRAMES, V.RES, V.RES, 3) and clip.dtype == np.uint8


def test_splits_are_compositional():
    for md in V.prompts("train", 2000, 0):
        m = md["objects"][0]
        assert (m["color"], m["motion"]) not in V.HELDOUT_COLOR_DIRS
    held = V.prompts("heldout", 500, 0)
    assert all((m["objects"][0]["color"], m["objects"][0]["motion"]) in V.HELDOUT_COLOR_DIRS for m in held)
    assert Counter(m["tag"] for m in held) == {"motion": 250, "appear": 250}
    # the mover's phrase always fits the toy text encoder's 16 tokens; long "appear" captions naming
    # triangles/squares do not (the toy CLIP BPE splits those words, see diffalign/assets/README.md)
    from diffalign.benchmarks.toyworlds.pretrain_video import video_tokenizer

    tok = video_tokenizer()
    assert max(len(tok(m["prompt"].split(" then ")[0]).input_ids) for m in held) <= 16


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_judge_is_right_on_ground_truth(split):
    ok, n = Counter(), Counter()
    for clip, _, md in V.make_dataset(240, 11, split):
        n[md["tag"]] += 1
        ok[md["tag"]] += V.judge_clip(clip, md)[0]
    for tag in V.VIDEO_TAGS:
        assert n[tag] >= 100 and ok[tag] / n[tag] >= 0.99, (tag, ok[tag], n[tag])


def test_judge_rejects_wrong_prompts_reversed_and_frozen_clips():
    rng = np.random.default_rng(0)
    rejected = reversed_rej = frozen_rej = total = 0
    for clip, _, md in V.make_dataset(120, 5):
        total += 1
        rejected += not V.judge_clip(clip, V.perturb_metadata(md, rng))[0]
        reversed_rej += not V.judge_clip(clip[::-1].copy(), md)[0]  # moves the other way (and "disappears")
        frozen_rej += not V.judge_clip(np.repeat(clip[:1], V.FRAMES, 0), md)[0]  # no motion at all
    assert rejected / total >= 0.99 and reversed_rej == total and frozen_rej == total


def test_judge_tolerates_one_missing_frame_but_not_extra_objects():
    clip, _, md = next(V.make_dataset(1, 2))
    assert md["tag"] == "motion"
    dropped = clip.copy()
    dropped[3] = dropped[3].max()  # background-only frame in the middle: the mover is still tracked
    dropped[3][:] = 240
    assert V.judge_clip(dropped, md)[0]
    extra = clip.copy()
    other = [c for c in ("red", "blue", "green") if c != md["objects"][0]["color"]][0]
    from diffalign.benchmarks.toyworlds.shapes import PALETTE

    extra[:, 26:31, 1:6] = PALETTE[other]  # a square of another colour in every frame
    ok, reason = V.judge_clip(extra, md)
    assert not ok and "unexpected" in reason


def test_bad_clip_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\[F,H,W,3\]"):
        V.judge_clip(np.zeros((32, 32, 3), np.uint8), V.prompts("train", 1, 0)[0])
