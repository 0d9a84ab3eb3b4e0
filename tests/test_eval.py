"""`diffalign eval`: GenEval metadata, rule edge cases, detectors (tiny random Mask2Former and CLIP),
win rates, the resumable harness on the shipped toy models, and the HTML report in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffalign.benchmarks.geneval import detectors, generation, harness, judging, prompts
from diffalign.benchmarks.geneval.detectors import (
    CLIPColorClassifier,
    Mask2FormerDetector,
    ShapesDetector,
    Thresholds,
    assign_colors,
    geneval_name,
    mask_box,
    masked_crop,
)
from diffalign.benchmarks.geneval.metadata import (
    COCO_CLASSES,
    MetadataError,
    geneval_prompts,
    read_metadata,
    read_prompt_rows,
    tag_counts,
    write_metadata,
)
from diffalign.benchmarks.geneval.rules import TAGS, Detection, judge, select_detections
from diffalign.benchmarks.geneval.winrate import (
    bootstrap_ci,
    head_to_head,
    per_prompt_win_rates,
    win_rate_summary,
    win_rates_by_reward,
)
from diffalign.demo import asset

from conftest import chromium_screenshot_cmd


def det(cls, x, y, size=10.0, *, color=None, score=1.0):
    h = size / 2
    return Detection(cls=cls, score=score, box=(x - h, y - h, x + h, y + h), color=color)


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip(tmp_path):
    rows = geneval_prompts(n=4, seed=1)
    f = write_metadata(tmp_path / "evaluation_metadata.jsonl", rows)
    assert read_metadata(f) == json.loads(json.dumps(rows))
    assert f.read_text().count("\n") == len(rows)


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{not json", "not valid JSON"),
        ('{"tag": "colors", "include": [{"class": "cat", "count": 1}]}', "'prompt'"),
        ('{"tag": "counting", "prompt": "p", "include": [{"class": "cat", "count": 0}]}', "'count' >= 1"),
        (
            '{"tag": "colors", "prompt": "p", "include": [{"class": "cat", "count": 1, "colour": "red"}]}',
            "'colour'",
        ),
        (
            '{"tag": "position", "prompt": "p", '
            '"include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]}',
            "earlier entry",
        ),
        (
            '{"tag": "position", "prompt": "p", "include": [{"class": "a", "count": 1}, '
            '{"class": "b", "count": 1, "position": ["near", 0]}]}',
            "relation",
        ),
        (
            '{"tag": "counting", "prompt": "p", "include": [{"class": "cat", "count": 2}], '
            '"exclude": {"class": "cat"}}',
            "'exclude' must be a list",
        ),
        ('["a list"]', "JSON object"),
    ],
)
def test_bad_metadata_row_is_one_line_naming_file_and_line(tmp_path, bad, words):
    good = json.dumps(
        {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    )
    f = tmp_path / "meta.jsonl"
    f.write_text(good + "\n\n" + bad + "\n")
    with pytest.raises(MetadataError) as e:
        read_metadata(f)
    msg = str(e.value)
    assert msg.startswith(f"{f}:3: ") and words in msg and "\n" not in msg


def test_templates_reproduce_genevals_own_suite():
    rows = geneval_prompts()  # GenEval's create_prompts.py defaults: n=100, seed 43
    assert tag_counts(rows) == {
        "single_object": 80,
        "two_object": 99,
        "counting": 80,
        "colors": 94,
        "position": 100,
        "color_attr": 100,
    }  # 553, as in the published file
    assert [r["prompt"] for r in rows[:3]] == [
        "a photo of a bench",
        "a photo of a cow",
        "a photo of a bicycle",
    ]
    first = {t: next(r for r in rows if r["tag"] == t) for t in TAGS}
    assert first["counting"] == {
        "tag": "counting",
        "include": [{"class": "clock", "count": 2}],
        "exclude": [{"class": "clock", "count": 3}],
        "prompt": "a photo of two clocks",
    }
    assert first["position"]["prompt"] == "a photo of a dog right of a teddy bear"
    assert first["position"]["include"] == [
        {"class": "teddy bear", "count": 1},
        {"class": "dog", "count": 1, "position": ["right of", 0]},
    ]
    assert first["colors"]["prompt"] == "a photo of a blue fire hydrant"
    assert not any(req["class"] == "person" and "color" in req for r in rows for req in r["include"])
    assert {req["class"] for r in rows for req in r["include"]} <= set(COCO_CLASSES)
    small = geneval_prompts(
        n=3, seed=0, classes=["circle", "square", "triangle"], colors=["red", "blue"], no_color_class=None
    )
    assert tag_counts(small)["single_object"] == 3 and all(
        r["prompt"].startswith("a photo of ") for r in small
    )


def test_plain_prompt_files(tmp_path):
    (tmp_path / "parti.tsv").write_text(
        "Prompt\tCategory\tChallenge\na red bus\tVehicles\tColor\na cat\tAnimals\tBasic\n"
    )
    (tmp_path / "anime.json").write_text(json.dumps(["a girl", "a castle"]))
    (tmp_path / "p.txt").write_text("one\n\ntwo\n")
    assert read_prompt_rows(tmp_path / "parti.tsv") == [
        {"prompt": "a red bus", "category": "Vehicles"},
        {"prompt": "a cat", "category": "Animals"},
    ]
    assert read_prompt_rows(tmp_path / "anime.json")[1] == {"prompt": "a castle", "category": "anime"}
    assert [r["prompt"] for r in read_prompt_rows(tmp_path / "p.txt")] == ["one", "two"]
    (tmp_path / "bad.json").write_text(json.dumps(["ok", {"no": "prompt"}]))
    with pytest.raises(MetadataError, match=r"bad\.json:2: item 2 has no prompt"):
        read_prompt_rows(tmp_path / "bad.json")
    rows = [{"tag": t, "i": i} for i, t in enumerate("aaaabbc")]
    assert [r["i"] for r in prompts.take_balanced(rows, 4, "tag")] == [0, 1, 4, 6]  # round-robin, file order


# ---------------------------------------------------------------- rules: edge cases not in test_geneval_rules


COUNT2 = {
    "tag": "counting",
    "include": [{"class": "cat", "count": 2}],
    "exclude": [{"class": "cat", "count": 3}],
    "prompt": "a photo of two cats",
}


def test_thresholds_are_strict():
    single = {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}
    assert not judge([det("cat", 10, 10, score=0.3)], single)[0]  # GenEval keeps score > 0.3 only
    assert judge([det("cat", 10, 10, score=0.3001)], single)[0]
    assert not judge([det("cat", 10, 10, score=0.9), det("cat", 30, 10, score=0.95)], COUNT2)[
        0
    ]  # 0.9 is not > 0.9


def test_exact_counting_counts_only_confident_objects():
    two = [det("cat", 10, 10, score=0.95), det("cat", 30, 10, score=0.99)]
    assert judge([*two, det("cat", 50, 10, score=0.8)], COUNT2)[0]  # a weak third cat is not counted
    ok, reason = judge([*two, det("cat", 50, 10, score=0.91)], COUNT2)
    assert not ok and reason == "expected cat<3, found 3"
    # outside the counting tag the exclude clause uses the 0.3 threshold
    other = COUNT2 | {"tag": "two_object"}
    assert not judge([*two, det("cat", 50, 10, score=0.8)], other)[0]


def test_max_objects_caps_exclude_counting():
    many = [det("cat", 5 + 3 * i, 10, score=0.95) for i in range(17)]
    sixteen = {
        "tag": "counting",
        "include": [{"class": "cat", "count": 15}],
        "exclude": [{"class": "cat", "count": 16}],
        "prompt": "p",
    }
    assert not judge(many, sixteen)[0]  # 16 kept -> "fewer than 16" fails
    seventeen = {
        "tag": "counting",
        "include": [{"class": "cat", "count": 16}],
        "exclude": [{"class": "cat", "count": 17}],
        "prompt": "p",
    }
    assert judge(many, seventeen)[0]  # GenEval keeps 16 per class, so 17 objects never trip "fewer than 17"
    assert not judge(many, seventeen, max_objects=17)[0]
    assert len(select_detections(many, "counting")["cat"]) == 16


def test_nms_off_by_default_and_on_when_asked():
    dup = [det("cat", 10, 10, score=0.99), det("cat", 10.5, 10, score=0.98)]  # the same cat twice
    assert not judge(
        dup,
        {
            "tag": "single_object",
            "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "cat", "count": 2}],
            "prompt": "p",
        },
    )[0]
    assert len(select_detections(dup, "counting", nms_iou=0.5)["cat"]) == 1
    assert judge(dup + [det("cat", 40, 10, score=0.97)], COUNT2, nms_iou=0.5)[0]


LEFT = {
    "tag": "position",
    "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a cat left of a dog",
}


def test_position_uses_only_the_most_confident_reference_and_every_subject():
    cat, dog = det("cat", 10, 50, score=0.9), det("dog", 60, 50, score=0.9)
    assert judge([cat, dog, det("dog", 2, 50, score=0.5)], LEFT)[0]  # weaker dog on the wrong side is ignored
    assert not judge([cat, dog, det("dog", 2, 50, score=0.95)], LEFT)[0]  # ... unless it is the top dog
    two = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 2, "position": ["left of", 0]}],
        "prompt": "p",
    }
    assert judge([cat, det("cat", 20, 50), dog], two)[0]
    ok, reason = judge([cat, det("cat", 90, 50), dog], two)  # every kept cat must be left of the dog
    assert not ok and reason == "expected cat left of target, found right of target"
    # a diagonal placement holding both relations satisfies "left of"
    assert judge([det("cat", 10, 10), det("dog", 60, 60)], LEFT)[0]


def test_position_needs_the_reference_group_to_have_matched():
    colored = {
        "tag": "position",
        "include": [
            {"class": "dog", "count": 1, "color": "red"},
            {"class": "cat", "count": 1, "position": ["left of", 0]},
        ],
        "prompt": "p",
    }
    ok, reason = judge([det("cat", 10, 50), det("dog", 60, 50, color="blue")], colored)
    assert not ok and reason.splitlines()[1] == "no target for cat to be left of"
    subj = {
        "tag": "position",
        "include": [
            {"class": "dog", "count": 1},
            {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]},
        ],
        "prompt": "p",
    }
    ok, reason = judge([det("cat", 90, 50, color="blue"), det("dog", 60, 50)], subj)
    assert (
        not ok and len(reason.splitlines()) == 1 and "red cat" in reason
    )  # position not checked after a colour miss


# --------------------------------------------------------------------------- detectors


class RecordingClassifier:
    def __init__(self, answer="red"):
        self.calls, self.answer = [], answer

    def classify(self, image, detections, classname):
        self.calls.append((classname, [d.score for d in detections]))
        return [self.answer] * len(detections)


def test_assign_colors_classifies_only_what_the_rules_check():
    md = {
        "tag": "color_attr",
        "include": [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1}],
        "prompt": "p",
    }
    dets = [
        det("cat", 10, 10, score=0.5),
        det("cat", 30, 10, score=0.8),
        det("cat", 50, 10, score=0.2),
        det("dog", 70, 10, score=0.9),
    ]
    clf = RecordingClassifier()
    assign_colors(np.zeros((80, 80, 3), np.uint8), dets, md, clf)
    assert clf.calls == [("cat", [0.8])]  # top-1 cat only; the dog has no colour clause
    assert [d.color for d in dets] == [None, "red", None, None]
    assert judge(dets, md)[0]


def test_masked_crop_pastes_on_grey_and_cuts_the_box():
    img = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 8:12] = True
    crop = masked_crop(img, (7.6, 4.4, 12.4, 10.5), mask)
    assert crop.shape == (6, 4, 3)  # rows round(4.4)=4..round(10.5)=10, cols 8..12
    np.testing.assert_array_equal(crop[1:6], img[5:10, 8:12])
    assert (crop[0] == 153).all()  # outside the mask: GenEval's #999
    assert masked_crop(img, (0, 0, 30, 20), None).shape == img.shape


def test_clip_color_classifier_matches_a_by_hand_zero_shot(tiny_clip):
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer

    clf = CLIPColorClassifier(str(tiny_clip))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 5:25] = True
    dets = [Detection("cat", 0.9, mask_box(mask), mask), Detection("cat", 0.8, (0, 0, 40, 40), None)]
    colors = clf.classify(img, dets, "cat")
    assert len(colors) == 2 and set(colors) <= set(clf.colors)

    model, tok = (
        CLIPModel.from_pretrained(str(tiny_clip)).eval(),
        CLIPTokenizer.from_pretrained(str(tiny_clip)),
    )
    with torch.no_grad():
        text = []
        for c in clf.colors:
            ids = tok(
                [f"a photo of a {c} cat", f"a photo of a {c}-colored cat", "a photo of a " + c + " object"],
                padding=True,
                return_tensors="pt",
            )
            e = model.get_text_features(**ids)
            text.append(F.normalize(F.normalize(getattr(e, "pooler_output", e), dim=-1).mean(0), dim=-1))
        crop = np.where(mask[..., None], img, 153)[10:30, 5:25]
        # PIL's bicubic resize of the uint8 crop (torch's uint8 kernel matches it), then [0, 1]
        x = torch.from_numpy(crop).permute(2, 0, 1)[None].contiguous()
        x = F.interpolate(x, size=(30, 30), mode="bicubic", align_corners=False, antialias=True).float() / 255
        x = (x - torch.tensor(clf.pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(clf.pre["std"]).view(
            1, 3, 1, 1
        )
        e = model.get_image_features(pixel_values=x)
        logits = 100 * F.normalize(getattr(e, "pooler_output", e), dim=-1) @ torch.stack(text).T
    torch.testing.assert_close(clf.logits(img, dets[:1], "cat"), logits, atol=1e-3, rtol=1e-4)
    assert colors[0] == clf.colors[int(logits.argmax())]


M2F_LABELS = ["person", "cat", "dog", "mouse", "remote"]


@pytest.fixture(scope="module")
def tiny_mask2former(tmp_path_factory) -> Path:
    """A random Mask2Former (tiny Swin backbone, built offline), saved like a hub checkpoint."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    out = tmp_path_factory.mktemp("m2f") / "mask2former"
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    cfg = Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        dim_feedforward=32,
        num_queries=12,
        id2label=dict(enumerate(M2F_LABELS)),
        label2id={n: i for i, n in enumerate(M2F_LABELS)},
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(str(out))
    Mask2FormerImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32
    ).save_pretrained(str(out))
    return out


def test_mask2former_detector_real_loader_plumbing(tiny_mask2former, tiny_clip):
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (48, 64, 3), dtype=np.uint8),
        rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
    ]
    th = Thresholds(score=0.01, counting=0.02, max_objects=2)
    d = Mask2FormerDetector(
        str(tiny_mask2former), thresholds=th, color_classifier=CLIPColorClassifier(str(tiny_clip))
    )
    assert d.names == ["person", "cat", "dog", "computer mouse", "tv remote"]  # GenEval's spellings
    out = d.detect(images)
    assert len(out) == 2 and sum(map(len, out)) > 0
    for im, dets in zip(images, out):
        scores = [x.score for x in dets]
        assert scores == sorted(scores, reverse=True) and all(s > 0.01 for s in scores)
        for cls in {x.cls for x in dets}:
            assert cls in d.names and sum(x.cls == cls for x in dets) <= 2  # max_objects per class
        for x in dets:
            assert x.mask.shape == im.shape[:2] and x.mask.dtype == bool and x.color is None
            assert x.box == mask_box(x.mask) and 0 <= x.box[0] < x.box[2] <= im.shape[1]
    assert (
        len(
            Mask2FormerDetector(str(tiny_mask2former), thresholds=Thresholds(max_objects=1)).detect(
                images[:1]
            )[0]
        )
        == 0
    )
    single = d.detect(images[0])  # one image in, one list out
    assert [x.score for x in single] == [x.score for x in out[0]]

    # judged through the harness, colour prompts get colours from the CLIP classifier
    top = out[0][0]
    md = {"tag": "colors", "include": [{"class": top.cls, "count": 1, "color": "red"}], "prompt": "p"}
    res = judging.judge_image(d, images[0], md)
    assert set(res) == {"correct", "reason", "details"} and isinstance(res["correct"], bool)
    details = json.loads(res["details"])
    assert details[top.cls][0] == pytest.approx([*top.box, top.score])
    assert res["correct"] or res["reason"].startswith(f"expected red {top.cls}>=1, found 0 red; and 1 ")


def test_mask2former_masks_follow_the_image_through_resize_and_padding(tiny_mask2former):
    """Masks are cut to the unpadded image before scaling: a query covering the left half of the
    valid area comes back as the left half of a non-square image."""
    d = Mask2FormerDetector(str(tiny_mask2former))

    def fake_model(pixel_values, pixel_mask=None):
        b, _, hp, wp = pixel_values.shape
        hm, wm = hp // 4, wp // 4
        masks = torch.full((b, 3, hm, wm), -20.0)
        cls = torch.full((b, 3, len(M2F_LABELS) + 1), -20.0)
        cls[:, :, -1] = 20.0  # queries 1, 2: no object
        cls[:, 0, 2], cls[:, 0, -1] = 20.0, -20.0  # query 0: a dog ...
        for i in range(b):
            hv = int(pixel_mask[i].any(1).sum()) * hm // hp
            wv = int(pixel_mask[i].any(0).sum()) * wm // wp
            masks[i, 0, :hv, : wv // 2] = 20.0  # ... covering the left half of the real image
        return SimpleNamespace(class_queries_logits=cls, masks_queries_logits=masks)

    d.model = fake_model
    images = [
        np.zeros((48, 96, 3), np.uint8),
        np.zeros((64, 64, 3), np.uint8),
    ]  # padded differently in one batch
    for im, dets in zip(images, d.detect(images)):
        assert [x.cls for x in dets] == ["dog"] and dets[0].score > 0.99
        h, w = im.shape[:2]
        x1, y1, x2, y2 = dets[0].box
        assert (x1, y1, y2) == (0, 0, h) and abs(x2 - w / 2) <= 2, (im.shape, dets[0].box)


def test_shapes_detector_and_label_names():
    from diffalign.benchmarks.toyworlds.shapes import layout, render

    md = {
        "tag": "colors",
        "include": [{"class": "circle", "count": 1, "color": "red"}],
        "prompt": "a photo of a red circle",
    }
    img = render(layout(md, np.random.default_rng(0)))
    d = ShapesDetector()
    assert [(x.cls, x.color) for x in d.detect(img)] == [("circle", "red")]
    assert judging.judge_image(d, img, md)["correct"]
    assert [geneval_name(n) for n in ("keyboard", "hair_drier", "Dining-Table", "tvmonitor")] == [
        "computer keyboard",
        "hair drier",
        "dining table",
        "tv",
    ]


# --------------------------------------------------------------------------- win rates


def test_win_rate_by_hand():
    a, b = [[1.0, 2.0], [5.0, 5.0], [0.0, 0.0]], [[2.0, 3.0], [1.0, 5.0], [1.0, 1.0]]
    # prompt 0: 2>1, 2=2 (tie), 3>1, 3>2 -> 3.5/4; prompt 1: 1<5, 1<5, 5=5, 5=5 -> 1/4; prompt 2: all won
    np.testing.assert_allclose(per_prompt_win_rates(a, b), [0.875, 0.25, 1.0])
    np.testing.assert_allclose(per_prompt_win_rates(a, b, "seed"), [1.0, 0.25, 1.0])  # (2v1, 3v2), (1v5, 5v5)
    assert head_to_head([1.0], [1.05], tie_eps=0.1) == 0.5
    s = win_rate_summary(a, b, n_boot=500)
    assert s["win_rate_mean"] == pytest.approx((0.875 + 0.25 + 1.0) / 3)
    assert s["win_rate_median"] == 0.875
    assert (s["prompts_won"], s["prompts_tied"], s["prompts_lost"]) == (2, 0, 1)
    assert s["a_mean"] == pytest.approx(13 / 6) and s["b_median"] == pytest.approx(1.5)
    assert s["mean_diff"] == pytest.approx(((2.5 - 1.5) + (3 - 5) + 1) / 3)
    lo, hi = s["win_rate_mean_ci95"]
    assert 0.25 <= lo <= s["win_rate_mean"] <= hi <= 1.0
    assert bootstrap_ci([0.5] * 10) == [0.5, 0.5]
    by = win_rates_by_reward({"r": {"A": a, "B": b}}, "A", "B", categories=["x", "x", "y"], n_boot=100)
    assert by["r"]["by_category"]["x"]["win_rate_mean"] == pytest.approx(0.5625)
    assert by["r"]["by_category"]["y"]["win_rate_mean"] == 1.0


# ---------------------------------------------------------------------- the harness on the shipped toy models


def toy_cfg(out: Path) -> harness.EvalConfig:
    """6 ShapesWorld prompts x 1 image x 2 steps; toy-sd vs toy-sd3, one toy reward."""
    return harness.EvalConfig(
        model=asset("toy-sd"),
        compare=asset("toy-sd3"),
        out=str(out),
        toy="train",
        n_prompts=6,
        per_prompt=1,
        steps=2,
        rewards=[f"pickscore={asset('toy-clip-a')}"],
        n_boot=200,
        device="cpu",
    )


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "run"
    out = harness.run_eval(toy_cfg(root), log=lambda *a: None)
    return root, out


def test_toy_eval_on_toy_sd_and_toy_sd3(toy_run):
    root, out = toy_run
    assert out["generated"] == {"model": 6, "compare": 6}
    for label in ("model", "compare"):  # toy-sd and toy-sd3 both get per-tag scores
        s = out["models"][label]["geneval"]
        assert list(s["per_tag"]) == list(TAGS) and s["n_per_tag"] == dict.fromkeys(TAGS, 1)
        assert s["overall"] == pytest.approx(np.mean(list(s["per_tag"].values())))
        assert s["overall_ci95"][0] <= s["overall"] <= s["overall_ci95"][1]
        assert json.loads((root / label / "summary.json").read_text())["per_tag"] == s["per_tag"]
        rows = [json.loads(x) for x in (root / label / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        for r in rows:  # GenEval's per-image format
            assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(r)
            assert (root / r["filename"]).is_file() and json.loads(r["metadata"])["prompt"] == r["prompt"]
            assert isinstance(json.loads(r["details"]), dict) and r["correct"] == (r["reason"] == "")
        # GenEval folder layout: metadata.jsonl holds one object; samples/NNNNN.png
        md = json.loads((root / label / "00003" / "metadata.jsonl").read_text())
        assert md == read_metadata(root / "prompts.jsonl")[3]
    d = out["difference"]
    assert d["overall"] == pytest.approx(
        out["models"]["compare"]["geneval"]["overall"] - out["models"]["model"]["geneval"]["overall"]
    )
    w = out["win_rates"]["pickscore"]
    assert (
        w["n_prompts"] == 6
        and 0 <= w["win_rate_mean"] <= 1
        and set(out["rewards"]["pickscore"]) == {"model", "compare"}
    )
    assert json.loads((root / "summary.json").read_text())["win_rates"] == json.loads(
        json.dumps(out["win_rates"])
    )


def test_resume_regenerates_only_missing_images(toy_run, tmp_path, monkeypatch):
    src, _ = toy_run
    root = tmp_path / "run"
    shutil.copytree(src, root)
    gone = [
        root / "model" / "00001" / "samples" / "00000.png",
        root / "model" / "00004" / "samples" / "00000.png",
        root / "compare" / "00002" / "samples" / "00000.png",
    ]
    for p in gone:
        p.unlink()
    stale = root / "model" / "00000" / "samples" / ".00000.png.99.tmp"  # an interrupted write
    stale.write_bytes(b"partial")
    kept = {p: p.stat().st_mtime_ns for p in root.glob("*/0*/samples/*.png")}
    prompts_seen = []
    real_load = generation.load_model

    def counting_load(spec, device):
        pipe, kw = real_load(spec, device)

        def call(prompts, **call_kw):
            prompts_seen.append(list(prompts))
            return pipe(prompts, **call_kw)

        return call, kw

    monkeypatch.setattr(generation, "load_model", counting_load)
    out = harness.run_eval(toy_cfg(root), log=lambda *a: None)
    assert out["generated"] == {"model": 2, "compare": 1}
    rows = read_metadata(root / "prompts.jsonl")
    # a batch with a missing image is generated whole (its other images are not rewritten), so the
    # resumed images equal an uninterrupted run's; all 6 prompts form one batch here
    assert prompts_seen == [[r["prompt"] for r in rows]] * 2
    assert all(p.is_file() for p in gone) and not stale.exists()
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished images untouched

    # nothing missing: no model, detector or reward is even loaded; everything comes from the caches
    def refuse(*a, **k):
        raise AssertionError("should not load")

    monkeypatch.setattr(generation, "load_model", refuse)
    monkeypatch.setattr(detectors, "build_detector", refuse)
    monkeypatch.setattr("diffalign.rewards.load_rewards", refuse)
    again = harness.run_eval(toy_cfg(root), log=lambda *a: None)
    assert again["generated"] == {"model": 0, "compare": 0}
    assert again["models"] == json.loads(json.dumps(out["models"]))

    from diffalign.cli import main  # the CLI continues the same folder the same way

    assert (
        main(
            [
                "eval",
                "--model",
                asset("toy-sd"),
                "--compare",
                asset("toy-sd3"),
                "--toy",
                "train",
                "--n-prompts",
                "6",
                "--per-prompt",
                "1",
                "--steps",
                "2",
                "--reward",
                f"pickscore={asset('toy-clip-a')}",
                "--bootstrap",
                "200",
                "--device",
                "cpu",
                "--no-report",
                "--out",
                str(root),
            ]
        )
        == 0
    )


def test_rerun_with_other_settings_is_refused(toy_run, tmp_path, capsys):
    from diffalign.cli import main

    root, _ = toy_run
    code = main(
        [
            "eval",
            "--model",
            asset("toy-sd"),
            "--toy",
            "train",
            "--n-prompts",
            "6",
            "--per-prompt",
            "1",
            "--steps",
            "8",
            "--out",
            str(root),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "steps 2 -> 8" in err and "\n" not in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tag": "colors", "prompt": "p", "include": []}\n')
    assert (
        main(["eval", "--model", asset("toy-sd"), "--metadata", str(bad), "--out", str(tmp_path / "o")]) == 2
    )
    assert f"{bad}:1: needs a non-empty 'include' list" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                asset("toy-sd"),
                "--toy",
                "train",
                "--reward",
                "pickscor=x",
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )  # unknown names fail before anything is generated
    assert "pickscore" in capsys.readouterr().err and not any(
        (tmp_path / "o2" / "model").glob("*/samples/*.png")
    )


def test_report_files(toy_run):
    root, _ = toy_run
    rep = root / "report"
    html = (rep / "index.html").read_text()
    assert (
        html.count("data:image/png;base64,") == 1 + len(TAGS) + 2
    )  # bars, a grid per tag, reward + win-rate plots
    assert "<table>" in html and "compare - model" in html
    assert json.loads((rep / "metrics.json").read_text())["models"]["model"]["geneval"]["per_tag"]
    md = (rep / "report.md").read_text()
    assert "| **overall** |" in md and "pickscore" in md


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (.ci/run installs it)"
)
def test_report_renders_in_headless_chromium(toy_run, tmp_path):
    from PIL import Image

    root, _ = toy_run
    shot = tmp_path / "shot.png"
    cmd = chromium_screenshot_cmd(f"file://{root / 'report' / 'index.html'}", shot)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert "Page load failed" not in p.stderr and ":CONSOLE(" not in p.stderr, p.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 500
    assert (img < 200).any(axis=-1).mean() > 0.01  # something was drawn
    assert (np.abs(img.astype(int) - [40, 170, 60]).sum(-1) < 30).any() or (
        np.abs(img.astype(int) - [215, 40, 40]).sum(-1) < 30
    ).any()  # judged frames are visible


def test_reward_only_eval_on_prompt_files(tmp_path):
    """PartiPrompts-style file, no judging: the same model twice gives identical images, so every
    head-to-head comparison is a tie and the win rate is exactly 1/2, overall and per category."""
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\na red circle\tShapes\na blue square\tShapes\na green triangle\tColors\n"
    )
    cfg = harness.EvalConfig(
        model=asset("toy-sd"),
        compare=asset("toy-sd"),
        out=str(tmp_path / "run"),
        prompts=[str(parti)],
        n_prompts=2,
        per_prompt=1,
        steps=2,
        n_boot=100,
        device="cpu",
        rewards=[f"pickscore={asset('toy-clip-b')}"],
    )
    out = harness.run_eval(cfg, log=lambda *a: None)
    assert not out["judged"] and "geneval" not in out["models"]["model"]
    assert [r["category"] for r in read_metadata_rows(tmp_path / "run" / "prompts.jsonl")] == [
        "Shapes",
        "Colors",
    ]
    w = out["win_rates"]["pickscore"]
    assert w["win_rate_mean"] == 0.5 and w["prompts_tied"] == 2 and w["mean_diff"] == 0.0
    assert set(w["by_category"]) == {"Shapes", "Colors"}
    assert (tmp_path / "run" / "report" / "samples.png").is_file()


def read_metadata_rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_load_model_accepts_a_diffalign_run_folder(tmp_path, monkeypatch):
    import diffalign.models.loading as loading

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step-10"
    ckpt.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-10")
    (ckpt / "state.json").write_text(
        json.dumps({"model_path": asset("toy-sd3"), "lora": True, "family": "sd3"})
    )
    seen = []

    class Pipe:
        def set_progress_bar_config(self, **kw):
            pass

    monkeypatch.setattr(loading, "load_trained_pipeline", lambda p, device: seen.append(Path(p)) or Pipe())
    pipe, kw = generation.load_model(str(run), "cpu")
    assert seen == [run] and isinstance(pipe, Pipe)
    assert kw == {"max_sequence_length": 0}  # the base model's sampling defaults (toy-sd3 has no T5)


def test_run_folder_settings_pin_the_checkpoint(tmp_path):
    """A diffalign run that trained further between two evals must not mix into the old images."""
    from diffalign.benchmarks.geneval.settings import EvalConfig, settings_for

    run = tmp_path / "run"
    for step in (1, 2):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "state.json").write_text(f'{{"step": {step}}}')
    (run / "checkpoints" / "latest").write_text("step-000001")
    cfg = EvalConfig.__new__(EvalConfig)
    cfg.size, cfg.seed = None, 0
    a = settings_for(cfg, str(run), 20, 4.0)
    (run / "checkpoints" / "latest").write_text("step-000002")
    b = settings_for(cfg, str(run), 20, 4.0)
    assert a["checkpoint"] == "step-000001" and b["checkpoint"] == "step-000002" and a != b
