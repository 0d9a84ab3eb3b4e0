"""The ShapesWorld judge as a training reward: strict (``shapes_judge``) and partial credit
(``shapes_partial``, Flow-GRPO's dense GenEval-style reward)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_geneval_rules import ATTR, COUNT2, LEFT, RED, TWO, det

from diffalign.benchmarks.geneval.rules import TAGS, judge, partial_credit
from diffalign.errors import ConfigError


def test_partial_credit_hand_derived():
    # two-object: circle found (1), square missing (0) -> 0.5
    assert partial_credit([det("circle", 8, 8)], TWO) == 0.5
    # counting two squares: 1 found -> 1 - 1/2 = 0.5; exclude (< 3) holds -> mean(0.5, 1) = 0.75
    assert partial_credit([det("square", 8, 8)], COUNT2) == 0.75
    # 3 found: count credit 1 - 1/2 = 0.5, exclude fails (0) -> 0.25
    three = [det("square", 8, 8), det("square", 24, 8), det("square", 16, 24)]
    assert partial_credit(three, COUNT2) == 0.25
    # colour: the circle is there (1) but blue (0) -> 0.5
    assert partial_credit([det("circle", 16, 16, color="blue")], RED) == 0.5
    # attribute binding: red circle right (1, 1), square present but red (1, 0) -> 0.75
    attr = [det("circle", 8, 8, color="red"), det("square", 24, 24, color="red")]
    assert partial_credit(attr, ATTR) == 0.75
    # position: both present (1, 1) but the circle is right of the square (0) -> 2/3
    assert partial_credit([det("square", 8, 16), det("circle", 24, 16)], LEFT) == pytest.approx(2 / 3)
    assert partial_credit([det("square", 24, 16), det("circle", 8, 16)], LEFT) == 1.0


def test_partial_credit_is_one_exactly_when_the_strict_judge_accepts():
    """On rendered ShapesWorld scenes, each judged against its own prompt and a perturbed one."""
    from diffalign.benchmarks.toyworlds.judge import detect
    from diffalign.benchmarks.toyworlds.shapes import perturb_metadata, render, sample_scene

    rng = np.random.default_rng(0)
    seen = {True: 0, False: 0}
    for i in range(60):
        scene = sample_scene(TAGS[i % len(TAGS)], rng)
        dets = detect(render(scene))
        for md in (scene.metadata, perturb_metadata(scene.metadata, rng)):
            ok = judge(dets, md)[0]
            credit = partial_credit(dets, md)
            assert (credit == 1.0) == ok, (md, credit)
            assert 0.0 <= credit <= 1.0
            seen[ok] += 1
    assert seen[True] > 20 and seen[False] > 20  # both outcomes exercised


def test_judge_rewards_score_tensors_and_refuse_unknown_prompts(tmp_path):
    import diffalign.benchmarks.toyworlds.judge_reward  # noqa: F401  (registers the rewards)
    from diffalign.benchmarks.toyworlds.shapes import render, sample_scene
    from diffalign.rewards import load_rewards

    rng = np.random.default_rng(1)
    scenes = [sample_scene("two_object", rng) for _ in range(3)]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(s.metadata) + "\n" for s in scenes))
    imgs = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2).float() / 255
    texts = [s.caption for s in scenes]
    r = load_rewards([f"shapes_judge={path}", f"shapes_partial={path}"])
    strict, partial = (v(imgs, texts).scores for v in r.values())
    assert strict.tolist() == [1.0, 1.0, 1.0] and partial.tolist() == [1.0, 1.0, 1.0]
    blank = torch.ones_like(imgs)  # a white image: nothing found
    assert r["shapes_judge"](blank, texts).scores.tolist() == [0.0] * 3
    assert r["shapes_partial"](blank, texts).scores.tolist() == [0.0] * 3
    with pytest.raises(ConfigError, match="is not in its metadata file"):
        r["shapes_judge"](imgs[:1], ["a photo of a dog"])
