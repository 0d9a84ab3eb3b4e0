"""GenEval judging rules on hand-built detections (no detector involved)."""

from __future__ import annotations

import pytest

from diffalign.benchmarks.geneval.rules import Detection, judge, relative_position, summarize


def det(cls: str, x: float, y: float, size: float = 10.0, *, color: str | None = None, score: float = 1.0):
    """A detection with a square box of side ``size`` centred at (x, y)."""
    h = size / 2
    return Detection(cls=cls, score=score, box=(x - h, y - h, x + h, y + h), color=color)


SINGLE = {
    "tag": "single_object",
    "include": [{"class": "circle", "count": 1}],
    "prompt": "a photo of a circle",
}
TWO = {
    "tag": "two_object",
    "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
    "prompt": "a photo of a circle and a square",
}
COUNT2 = {
    "tag": "counting",
    "include": [{"class": "square", "count": 2}],
    "exclude": [{"class": "square", "count": 3}],
    "prompt": "a photo of two squares",
}
RED = {
    "tag": "colors",
    "include": [{"class": "circle", "count": 1, "color": "red"}],
    "prompt": "a photo of a red circle",
}
LEFT = {
    "tag": "position",
    "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
    "prompt": "a photo of a circle left of a square",
}
ATTR = {
    "tag": "color_attr",
    "include": [
        {"class": "circle", "count": 1, "color": "red"},
        {"class": "square", "count": 1, "color": "blue"},
    ],
    "prompt": "a photo of a red circle and a blue square",
}


def test_single_object():
    assert judge([det("circle", 16, 16)], SINGLE) == (True, "")
    ok, reason = judge([det("square", 16, 16)], SINGLE)
    assert not ok and reason == "expected circle>=1, found 0"
    assert judge([det("circle", 5, 5), det("triangle", 25, 25)], SINGLE)[0]  # extras are fine


def test_two_object_missing_one():
    assert judge([det("circle", 8, 8), det("square", 24, 24)], TWO)[0]
    ok, reason = judge([det("circle", 8, 8), det("circle", 24, 24)], TWO)
    assert not ok and reason == "expected square>=1, found 0"


def test_counting_is_exact_through_exclude():
    two = [det("square", 8, 8), det("square", 24, 8)]
    assert judge(two, COUNT2)[0]
    ok, reason = judge([*two, det("square", 16, 24)], COUNT2)  # 3 found, exactly 2 asked
    assert not ok and reason == "expected square<3, found 3"
    ok, reason = judge(two[:1], COUNT2)
    assert not ok and reason == "expected square>=2, found 1"
    assert judge([*two, det("circle", 16, 24)], COUNT2)[0]  # other classes do not count


def test_counting_uses_the_stricter_score_threshold():
    weak = [det("square", 8, 8, score=0.95), det("square", 24, 8, score=0.5)]
    assert not judge(weak, COUNT2)[0]  # 0.5 <= 0.9: dropped for counting
    assert judge(weak[1:], SINGLE | {"include": [{"class": "square", "count": 1}]})[0]  # 0.5 > 0.3


def test_colors():
    assert judge([det("circle", 16, 16, color="red")], RED)[0]
    ok, reason = judge([det("circle", 16, 16, color="blue")], RED)
    assert not ok and reason == "expected red circle>=1, found 0 red; and 1 blue"
    assert not judge([det("circle", 16, 16)], RED)[0]  # unknown colour never matches


def test_color_is_checked_on_the_most_confident_object_only():
    blue_first = [det("circle", 8, 8, color="blue", score=0.9), det("circle", 24, 24, color="red", score=0.8)]
    assert not judge(blue_first, RED)[0]  # the red circle is not among the top-1
    red_first = [det("circle", 8, 8, color="blue", score=0.8), det("circle", 24, 24, color="red", score=0.9)]
    assert judge(red_first, RED)[0]


def test_position_clear_cases():
    assert judge([det("square", 24, 16), det("circle", 8, 16)], LEFT)[0]
    ok, reason = judge([det("square", 8, 16), det("circle", 24, 16)], LEFT)
    assert not ok and reason == "expected circle left of target, found right of target"
    ok, reason = judge([det("circle", 8, 16)], LEFT)  # reference missing
    assert not ok and reason.splitlines() == [
        "expected square>=1, found 0",
        "no target for circle to be left of",
    ]


def test_position_margin():
    # Boxes 10 wide: margin 0.1 * (10 + 10) = 2 px; a 1.5 px offset is no relation at all.
    assert relative_position((0, 0, 10, 10), (1.5, 0, 11.5, 10)) == set()
    ok, reason = judge([det("square", 17.5, 16), det("circle", 16, 16)], LEFT)
    assert not ok and reason == "expected circle left of target, found  target"
    assert judge([det("square", 17.5, 16), det("circle", 16, 16)], LEFT, position_margin=0.0)[0]
    # Beyond the margin the shrunk offset must still exceed half the full offset, so on
    # a pure axis the relation needs |offset| > 2 * margin: 4 px here.
    assert relative_position((0, 0, 10, 10), (3.9, 0, 13.9, 10)) == set()
    assert relative_position((0, 0, 10, 10), (4.1, 0, 14.1, 10)) == {"left of"}


def test_relative_position_axes_and_diagonals():
    a, b = (0, 0, 10, 10), (0, 20, 10, 30)  # a is higher in the image (y grows downward)
    assert relative_position(a, b) == {"above"}
    assert relative_position(b, a) == {"below"}
    assert relative_position((0, 0, 10, 10), (30, 30, 40, 40)) == {"left of", "above"}
    # Mostly horizontal: the vertical component is below half of the offset's length.
    assert relative_position((0, 5, 10, 15), (30, 0, 40, 10)) == {"left of"}


def test_color_attr_binding():
    good = [det("circle", 8, 8, color="red"), det("square", 24, 24, color="blue")]
    assert judge(good, ATTR)[0]
    swapped = [det("circle", 8, 8, color="blue"), det("square", 24, 24, color="red")]
    ok, reason = judge(swapped, ATTR)
    assert not ok and len(reason.splitlines()) == 2
    assert reason.splitlines()[0] == "expected red circle>=1, found 0 red; and 1 blue"


def test_summarize_averages_over_tags():
    results = [{"tag": "colors", "correct": c} for c in (True, True, True, False)]
    results += [
        {"tag": "position", "correct": False, "prompt": "p"},
        {"tag": "position", "correct": True, "prompt": "p"},
    ]
    out = summarize(results)
    assert out["per_tag"] == {"colors": 0.75, "position": 0.5}
    assert out["overall"] == pytest.approx(0.625)  # not the image mean 4/6
    assert out["images"] == pytest.approx(4 / 6)
    assert out["n_per_tag"] == {"colors": 4, "position": 2}
    assert out["prompts"] == 1.0  # the one prompt has a correct image
