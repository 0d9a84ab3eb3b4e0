"""ShapesWorld-video: short clips of ShapesWorld shapes moving, with an exact judge.

A clip is ``FRAMES`` frames of ``RES`` x ``RES`` RGB, rendered frame by frame with
:func:`.shapes.render` (same palette, shapes and anti-aliasing as the image world, so the
image judge's detector reads every frame). Two tags:

- ``motion``: one coloured shape travelling 10-14 px in a straight line over the clip:
  "a red circle moving left";
- ``appear``: the same, plus a second, static shape that is absent from the first half and
  present from frame ``APPEAR_FRAME`` on: "a red circle moving left then a blue square appearing".

The judge (:func:`judge_clip`) tracks objects by (class, colour) through per-frame detections:
the mover must be found in the first and last frames and in at least 3/4 of all frames, once
per frame, and its box centre must travel at least ``MIN_TRAVEL_PX`` along the named direction
with less than half that much sideways drift; the appearing object must be absent from the
first two frames and present in the last two; any other (class, colour) seen in two or more
frames fails the clip (a one-frame flicker is tolerated).

Held-out split: (colour, direction) pairs in :data:`HELDOUT_COLOR_DIRS` are never seen moving
that way in training (whatever the shape); every held-out prompt's mover has one of them, so
evaluation measures composing a known colour with a known motion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Literal

import numpy as np

from .shapes import COLORS, SHAPES, Color, Scene, ShapeObject, Split, render

Direction = Literal["left", "right", "up", "down"]
VideoTag = Literal["motion", "appear"]

FRAMES = 8
RES = 32
DIRECTIONS: tuple[Direction, ...] = ("left", "right", "up", "down")
# unit steps in image coordinates (y grows downward)
STEP: dict[Direction, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_TAGS: tuple[VideoTag, ...] = ("motion", "appear")
HELDOUT_COLOR_DIRS: frozenset[tuple[Color, Direction]] = frozenset(
    {("red", "left"), ("green", "up"), ("blue", "right"), ("yellow", "down")}
)
TRAVEL_PX = (10.0, 14.0)  # distance the mover covers between the first and the last frame
SIZE_PX = (7.0, 10.0)
APPEAR_FRAME = FRAMES // 2
MIN_TRAVEL_PX = 4.0  # judge: at least this far along the direction (true motion: 10-14 px)
MIN_FRAME_FRACTION = 0.75  # judge: the mover is found in at least this fraction of frames
_SPLIT_ID = {"train": 0, "heldout": 1}


def _np(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def build_metadata(
    tag: VideoTag, mover: tuple[str, str, str], other: tuple[str, str] | None = None
) -> dict[str, Any]:
    """Metadata for a mover ``(color, class, direction)`` and, for ``appear``, ``(color, class)``."""
    color, cls, direction = mover
    objects: list[dict[str, Any]] = [{"class": cls, "color": color, "motion": direction}]
    prompt = f"{_np(f'{color} {cls}')} moving {direction}"
    if tag == "appear":
        if other is None:
            raise ValueError("an 'appear' prompt needs the appearing object")
        objects.append({"class": other[1], "color": other[0], "appear": APPEAR_FRAME})
        prompt += f" then {_np(f'{other[0]} {other[1]}')} appearing"
    elif tag != "motion":
        raise ValueError(f"unknown video tag {tag!r}; valid choices: {', '.join(VIDEO_TAGS)}")
    return {"tag": tag, "prompt": prompt, "objects": objects}


def _in_split(md: Mapping[str, Any], split: Split) -> bool:
    m = md["objects"][0]
    return ((m["color"], m["motion"]) in HELDOUT_COLOR_DIRS) == (split == "heldout")


def sample_metadata(tag: VideoTag, rng: np.random.Generator, split: Split = "train") -> dict[str, Any]:
    for _ in range(1000):
        mover = (
            COLORS[rng.integers(len(COLORS))],
            SHAPES[rng.integers(len(SHAPES))],
            DIRECTIONS[rng.integers(4)],
        )
        other = None
        if tag == "appear":
            while True:  # a different (colour, class) so the two are told apart
                other = (COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
                if other != mover[:2]:
                    break
        md = build_metadata(tag, mover, other)
        if _in_split(md, split):
            return md
    raise RuntimeError(f"could not draw a {split} {tag} prompt")


def _centers(
    md: Mapping[str, Any], rng: np.random.Generator
) -> list[tuple[float, float, float, float, float]] | None:
    """(cx, cy, size, dx, dy) in pixels per object, the mover's path and the static object apart."""
    mover = md["objects"][0]
    ux, uy = STEP[mover["motion"]]
    s = float(rng.uniform(*SIZE_PX))
    travel = float(rng.uniform(*TRAVEL_PX))
    lo, hi = 1 + s / 2, RES - 1 - s / 2
    # start so that start + travel*u stays inside along the motion axis
    sx = float(rng.uniform(lo + max(0, -ux) * travel, hi - max(0, ux) * travel))
    sy = float(rng.uniform(lo + max(0, -uy) * travel, hi - max(0, uy) * travel))
    out = [(sx, sy, s, ux * travel, uy * travel)]
    if len(md["objects"]) > 1:
        # the path's bounding box, padded by 2 px, must not touch the static object
        px1, px2 = sorted((sx, sx + ux * travel))
        py1, py2 = sorted((sy, sy + uy * travel))
        for _ in range(200):
            s2 = float(rng.uniform(*SIZE_PX))
            cx, cy = rng.uniform(1 + s2 / 2, RES - 1 - s2 / 2, size=2)
            gap_x = max(px1 - s / 2 - (cx + s2 / 2), cx - s2 / 2 - (px2 + s / 2))
            gap_y = max(py1 - s / 2 - (cy + s2 / 2), cy - s2 / 2 - (py2 + s / 2))
            if max(gap_x, gap_y) >= 2.0:
                out.append((float(cx), float(cy), s2, 0.0, 0.0))
                return out
        return None
    return out


def render_clip(md: Mapping[str, Any], rng: np.random.Generator, size: int = RES) -> np.ndarray:
    """A clip satisfying ``md``: uint8 ``[FRAMES, size, size, 3]``."""
    for _ in range(100):
        geo = _centers(md, rng)
        if geo is not None:
            break
    else:
        raise RuntimeError(f"could not lay out {md['prompt']!r}")
    frames = []
    for f in range(FRAMES):
        a = f / (FRAMES - 1)
        objs = []
        for spec, (cx, cy, s, dx, dy) in zip(md["objects"], geo, strict=True):
            if f < spec.get("appear", 0):
                continue
            objs.append(
                ShapeObject(spec["class"], spec["color"], (cx + a * dx) / RES, (cy + a * dy) / RES, s / RES)
            )
        frames.append(render(Scene(tuple(objs), {}), size))
    return np.stack(frames)


def _split_rng(seed: int, split: Split, stream: int) -> np.random.Generator:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return np.random.default_rng([seed, _SPLIT_ID[split], stream, 7])


def make_dataset(
    n: int, seed: int, split: Split = "train"
) -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
    """Yield ``n`` (clip uint8 [F,H,W,3], caption, metadata), tags round-robin;
    item i does not depend on n."""
    rng = _split_rng(seed, split, 0)
    for i in range(n):
        md = sample_metadata(VIDEO_TAGS[i % len(VIDEO_TAGS)], rng, split)
        yield render_clip(md, rng), md["prompt"], md


def prompts(split: Split, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` metadata dicts of ``split``, tags balanced round-robin."""
    rng = _split_rng(seed, split, 1)
    return [sample_metadata(VIDEO_TAGS[i % len(VIDEO_TAGS)], rng, split) for i in range(n)]


def perturb_metadata(md: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """A same-tag prompt that a clip made for ``md`` does not satisfy (hard negative):
    another direction (most often: motion is what a frame-level reward cannot see), colour or class."""
    m = md["objects"][0]
    mover = (m["color"], m["class"], m["motion"])
    other = (md["objects"][1]["color"], md["objects"][1]["class"]) if md["tag"] == "appear" else None
    choice = rng.random()
    if choice < 0.6:
        mover = (mover[0], mover[1], str(rng.choice([d for d in DIRECTIONS if d != mover[2]])))
    elif choice < 0.8:
        mover = (str(rng.choice([c for c in COLORS if c != mover[0]])), mover[1], mover[2])
    else:
        mover = (mover[0], str(rng.choice([s for s in SHAPES if s != mover[1]])), mover[2])
    if other is not None and other == mover[:2]:  # the change collided with the static object
        other = (mover[0], str(rng.choice([s for s in SHAPES if s != mover[1]])))
    return build_metadata(md["tag"], mover, other)


# --------------------------------------------------------------------------- judge


def track(clip: np.ndarray) -> dict[tuple[str, str], list[list[tuple[float, float]]]]:
    """Per (class, colour): per frame the box centres of its detections (image judge per frame)."""
    from .judge import detect

    seen: dict[tuple[str, str], list[list[tuple[float, float]]]] = {}
    for f, frame in enumerate(clip):
        for d in detect(frame):
            key = (d.cls, d.color)
            seen.setdefault(key, [[] for _ in range(len(clip))])[f].append(
                ((d.box[0] + d.box[2]) / 2, (d.box[1] + d.box[3]) / 2)
            )
    return seen


def judge_clip(clip: np.ndarray, md: Mapping[str, Any]) -> tuple[bool, str]:
    """Judge a uint8 ``[F,H,W,3]`` clip against video metadata -> (correct, reason)."""
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a [F,H,W,3] clip, got shape {clip.shape}")
    F = len(clip)
    tracks = track(clip)
    mover = md["objects"][0]
    key = (mover["class"], mover["color"])
    name = f"{mover['color']} {mover['class']}"
    per_frame = tracks.get(key, [[] for _ in range(F)])
    if any(len(c) > 1 for c in per_frame):
        return False, f"more than one {name} in a frame"
    present = [f for f in range(F) if per_frame[f]]
    if not present or present[0] != 0 or present[-1] != F - 1 or len(present) < MIN_FRAME_FRACTION * F:
        return False, f"{name} found in frames {present} of {F}"
    (x0, y0), (x1, y1) = per_frame[0][0], per_frame[F - 1][0]
    ux, uy = STEP[mover["motion"]]
    scale = clip.shape[1] / RES
    along = ((x1 - x0) * ux + (y1 - y0) * uy) / scale
    side = abs((x1 - x0) * uy - (y1 - y0) * ux) / scale
    if along < MIN_TRAVEL_PX or side >= 0.5 * along:
        return False, f"{name} moved {along:+.1f} px {mover['motion']} and {side:.1f} px sideways"
    expected = {key}
    if md["tag"] == "appear":
        o = md["objects"][1]
        okey = (o["class"], o["color"])
        expected.add(okey)
        frames = tracks.get(okey, [[] for _ in range(F)])
        if frames[0] or frames[1]:
            return False, f"{o['color']} {o['class']} already there at the start"
        if not (frames[F - 2] and frames[F - 1]):
            return False, f"{o['color']} {o['class']} did not appear"
    extra = [k for k, fr in tracks.items() if k not in expected and sum(1 for c in fr if c) >= 2]
    if extra:
        return False, "unexpected " + ", ".join(f"{c} {s}" for s, c in extra)
    return True, "ok"
