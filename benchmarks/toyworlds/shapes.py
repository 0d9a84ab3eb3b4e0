"""ShapesWorld: a toy GenEval world of coloured circles, squares and triangles.

Scenes are a few flat-coloured shapes on a light-grey background, rendered with 4x4
supersampling (anti-aliased edges). Every sample carries a GenEval-format metadata
dict (``tag``, ``include``, optional ``exclude``, ``prompt``), built like GenEval's
``prompts/create_prompts.py`` builds its own, so :func:`..geneval.rules.judge`
judges ShapesWorld images and real GenEval images by the same rules
(:mod:`.judge` supplies the detections).

Scene geometry is resolution-free (fractions of the image side); object sizes are
7-11 px at 32x32 and scale with the output size.

Splits: ``"train"`` prompts contain none of the held-out combinations below, and no
train image shows a held-out (colour, shape) pair even where the prompt does not
name the colour. Every ``"heldout"`` prompt contains at least one held-out
combination; as ``single_object`` prompts ("a photo of a circle") hold no
combination, the heldout split has only the five other tags.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..geneval.rules import RELATIONS, TAGS, Relation, Tag, relative_position

Shape = Literal["circle", "square", "triangle"]
Color = Literal["red", "yellow", "green", "blue", "purple", "black"]
Split = Literal["train", "heldout"]

SHAPES: tuple[Shape, ...] = ("circle", "square", "triangle")
# Chosen for pixel separability: every colour is >= 160 RGB units from the others and
# its line towards the background passes >= 130 units from every other colour.
# All six names are in GenEval's colour vocabulary.
PALETTE: dict[Color, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 210, 0),
    "green": (40, 190, 50),
    "blue": (30, 70, 235),
    "purple": (185, 30, 205),
    "black": (25, 25, 25),
}
COLORS: tuple[Color, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (240, 240, 240)
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTS: tuple[int, ...] = (2, 3, 4)  # GenEval's counting prompts use 2..max_count=4

# Held-out combinations (the definition of the "heldout" split).
# (colour, shape) pairs, named in `colors` / `color_attr` prompts; never drawn in train.
HELDOUT_COLOR_SHAPES: frozenset[tuple[Color, Shape]] = frozenset(
    {("red", "triangle"), ("green", "circle"), ("blue", "square"), ("purple", "circle")}
)
# Ordered class pairs "a {A} and a {B}" (`two_object`, `color_attr`).
HELDOUT_PAIRS: frozenset[tuple[Shape, Shape]] = frozenset({("triangle", "circle"), ("square", "triangle")})
# Position triples (A, relation, B) for "a {A} {relation} a {B}": two layouts, each
# held out in both phrasings, so the held-out layouts are never described in train.
HELDOUT_POSITIONS: frozenset[tuple[Shape, Relation, Shape]] = frozenset(
    {
        ("circle", "above", "triangle"),
        ("triangle", "below", "circle"),
        ("square", "left of", "circle"),
        ("circle", "right of", "square"),
    }
)
# (count, shape) for "a photo of {count} {shape}s" (`counting`).
HELDOUT_COUNTS: frozenset[tuple[int, Shape]] = frozenset({(3, "circle"), (4, "triangle")})
HELDOUT_TAGS: tuple[Tag, ...] = tuple(t for t in TAGS if t != "single_object")

# Geometry, in pixels of a 32x32 image (scaled for other sizes).
REF_SIZE = 32
SIZE_RANGE_PX = (7.0, 11.0)
MAX_SIZE_PX = {1: 11.0, 2: 11.0, 3: 10.0, 4: 9.0}  # so four objects always fit
MIN_GAP_PX = 2.0  # between bounding boxes (Chebyshev gap)
BORDER_PX = 1.0
# Position scenes: the relation must hold with twice GenEval's margin, and the
# orthogonal relations must fail even without margin (clean, unambiguous layouts).
POSITION_SAFETY_MARGIN = 0.2


@dataclass(frozen=True)
class ShapeObject:
    """One shape; centre and size (side of its square bounding box) in image fractions."""

    cls: Shape
    color: Color
    cx: float
    cy: float
    size: float

    def box(self, image_size: int) -> tuple[float, float, float, float]:
        """Bounding box (x1, y1, x2, y2) in pixels of an ``image_size`` image."""
        h = self.size / 2
        return tuple(float(v * image_size) for v in (self.cx - h, self.cy - h, self.cx + h, self.cy + h))


@dataclass(frozen=True, eq=False)
class Scene:
    """A ShapesWorld scene: its objects and the GenEval metadata it satisfies."""

    objects: tuple[ShapeObject, ...]
    metadata: dict[str, Any]

    @property
    def caption(self) -> str:
        return self.metadata["prompt"]


# --------------------------------------------------------------------------- prompts


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _obj(cls: str, color: str | None = None) -> str:
    return _article(f"{color} {cls}" if color else cls)


def _metadata(
    tag: Tag, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    md: dict[str, Any] = {"tag": tag, "include": include}
    if exclude:
        md["exclude"] = exclude
    md["prompt"] = f"a photo of {prompt}"
    return md


def build_metadata(tag: Tag, params: tuple) -> dict[str, Any]:
    """GenEval metadata for ``tag`` from its parameters (see :func:`metadata_params`).

    single_object: (cls,); two_object: (a, b); counting: (cls, n); colors: (cls, color);
    position: (a, relation, b) meaning "a {a} {relation} a {b}";
    color_attr: (color_a, a, color_b, b).
    """
    if tag == "single_object":
        (cls,) = params
        return _metadata(tag, [{"class": cls, "count": 1}], _obj(cls))
    if tag == "two_object":
        a, b = params
        inc = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return _metadata(tag, inc, f"{_obj(a)} and {_obj(b)}")
    if tag == "counting":
        cls, n = params
        exc = [{"class": cls, "count": n + 1}]  # GenEval's exactness clause
        return _metadata(tag, [{"class": cls, "count": n}], f"{NUMBERS[n]} {cls}s", exc)
    if tag == "colors":
        cls, color = params
        return _metadata(tag, [{"class": cls, "count": 1, "color": color}], _obj(cls, color))
    if tag == "position":
        a, rel, b = params
        # GenEval lists the reference object first; the subject points at index 0.
        inc = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
        return _metadata(tag, inc, f"{_obj(a)} {rel} {_obj(b)}")
    if tag == "color_attr":
        ca, a, cb, b = params
        inc = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        return _metadata(tag, inc, f"{_obj(a, ca)} and {_obj(b, cb)}")
    raise ValueError(f"unknown tag {tag!r}")


def metadata_params(metadata: Mapping[str, Any]) -> tuple:
    """Inverse of :func:`build_metadata` for ShapesWorld metadata."""
    tag, inc = metadata["tag"], metadata["include"]
    if tag == "single_object":
        return (inc[0]["class"],)
    if tag == "two_object":
        return (inc[0]["class"], inc[1]["class"])
    if tag == "counting":
        return (inc[0]["class"], inc[0]["count"])
    if tag == "colors":
        return (inc[0]["class"], inc[0]["color"])
    if tag == "position":
        return (inc[1]["class"], inc[1]["position"][0], inc[0]["class"])
    if tag == "color_attr":
        return (inc[0]["color"], inc[0]["class"], inc[1]["color"], inc[1]["class"])
    raise ValueError(f"unknown tag {tag!r}")


def heldout_combinations(metadata: Mapping[str, Any]) -> list[tuple]:
    """Held-out combinations named by a prompt, e.g. [("color_shape", "red", "triangle")]."""
    inc = metadata.get("include", [])
    found: list[tuple] = []
    for req in inc:
        if (req.get("color"), req["class"]) in HELDOUT_COLOR_SHAPES:
            found.append(("color_shape", req["color"], req["class"]))
        if req["count"] > 1 and (req["count"], req["class"]) in HELDOUT_COUNTS:
            found.append(("count", req["count"], req["class"]))
        if "position" in req:
            rel, ref = req["position"]
            triple = (req["class"], rel, inc[ref]["class"])
            if triple in HELDOUT_POSITIONS:
                found.append(("position", *triple))
    if len(inc) == 2 and not any("position" in r for r in inc):  # "a {A} and a {B}"
        pair = (inc[0]["class"], inc[1]["class"])
        if pair in HELDOUT_PAIRS:
            found.append(("pair", *pair))
    return found


def _in_split(metadata: Mapping[str, Any], split: Split) -> bool:
    return bool(heldout_combinations(metadata)) == (split == "heldout")


def _draw_params(tag: Tag, rng: np.random.Generator) -> tuple:
    """Unconstrained GenEval-style draw (distinct classes/colours where GenEval has them)."""

    def pick(options, k=None):
        idx = rng.choice(len(options), size=k, replace=False)
        return options[idx] if k is None else tuple(options[i] for i in idx)

    if tag == "single_object":
        return (pick(SHAPES),)
    if tag == "two_object":
        return pick(SHAPES, 2)
    if tag == "counting":
        return (pick(SHAPES), pick(COUNTS))
    if tag == "colors":
        return (pick(SHAPES), pick(COLORS))
    if tag == "position":
        a, b = pick(SHAPES, 2)
        return (a, pick(RELATIONS), b)
    if tag == "color_attr":
        (a, b), (ca, cb) = pick(SHAPES, 2), pick(COLORS, 2)
        return (ca, a, cb, b)
    raise ValueError(f"unknown tag {tag!r}")


def sample_metadata(tag: Tag, rng: np.random.Generator, split: Split = "train") -> dict[str, Any]:
    """Draw one GenEval-format prompt of ``tag`` belonging to ``split``."""
    if split == "heldout" and tag not in HELDOUT_TAGS:
        raise ValueError(f"tag {tag!r} has no held-out combinations; use one of {HELDOUT_TAGS}")
    for _ in range(10_000):  # rejection sampling; acceptance is >= 1/6 for every tag
        md = build_metadata(tag, _draw_params(tag, rng))
        if _in_split(md, split):
            return md
    raise RuntimeError(f"could not draw a {split} prompt for {tag!r}")


# --------------------------------------------------------------------------- layout


def _allowed_colors(cls: str, split: Split) -> list[Color]:
    if split == "heldout":
        return list(COLORS)
    return [c for c in COLORS if (c, cls) not in HELDOUT_COLOR_SHAPES]


def _separated(a: tuple[float, float, float], b: tuple[float, float, float], gap: float) -> bool:
    """Boxes (cx, cy, size) at least ``gap`` apart along x or along y."""
    half = (a[2] + b[2]) / 2
    return abs(a[0] - b[0]) - half >= gap or abs(a[1] - b[1]) - half >= gap


def _place(n: int, rng: np.random.Generator, tries: int = 200) -> list[tuple[float, float, float]] | None:
    """Random non-overlapping (cx, cy, size) boxes in image fractions, or None."""
    lo, hi = SIZE_RANGE_PX[0] / REF_SIZE, MAX_SIZE_PX[n] / REF_SIZE
    gap, border = MIN_GAP_PX / REF_SIZE, BORDER_PX / REF_SIZE
    boxes: list[tuple[float, float, float]] = []
    for _ in range(tries):
        if len(boxes) == n:
            break
        s = float(rng.uniform(lo, hi))
        cx, cy = rng.uniform(border + s / 2, 1 - border - s / 2, size=2)
        cand = (float(cx), float(cy), s)
        if all(_separated(cand, b, gap) for b in boxes):
            boxes.append(cand)
    return boxes if len(boxes) == n else None


def _positions_ok(objects: list[ShapeObject], metadata: Mapping[str, Any]) -> bool:
    """Every position clause holds robustly on the true boxes (see POSITION_SAFETY_MARGIN)."""
    start = np.cumsum([0] + [r["count"] for r in metadata["include"]])  # first object per entry
    for i, req in enumerate(metadata["include"]):
        if "position" not in req:
            continue
        rel, ref = req["position"]
        axis = {"left of", "right of"} if rel in ("left of", "right of") else {"above", "below"}
        for a in objects[start[i] : start[i + 1]]:
            for b in objects[start[ref] : start[ref + 1]]:
                box_a, box_b = a.box(1), b.box(1)
                if rel not in relative_position(box_a, box_b, POSITION_SAFETY_MARGIN):
                    return False
                if relative_position(box_a, box_b, 0.0) - axis:
                    return False
    return True


def layout(metadata: Mapping[str, Any], rng: np.random.Generator, split: Split = "train") -> Scene:
    """Place objects so that the scene satisfies ``metadata`` exactly.

    One object per counted include entry (no distractors). Colours not named by
    the prompt are random; in the train split they avoid held-out (colour, shape) pairs.
    """
    specs = [(r["class"], r.get("color")) for r in metadata["include"] for _ in range(r["count"])]
    for _ in range(1000):
        boxes = _place(len(specs), rng)
        if boxes is None:
            continue
        objects = [
            ShapeObject(cls, color or _pick(_allowed_colors(cls, split), rng), *box)
            for (cls, color), box in zip(specs, boxes)
        ]
        if _positions_ok(objects, metadata):
            return Scene(tuple(objects), dict(metadata))
    raise RuntimeError(f"could not lay out {metadata['prompt']!r}")


def _pick(options: list, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def sample_scene(tag: Tag, rng: np.random.Generator, split: Split = "train") -> Scene:
    """Draw a prompt of ``tag`` in ``split`` and a scene that satisfies it."""
    return layout(sample_metadata(tag, rng, split), rng, split)


# --------------------------------------------------------------------------- rendering


def unit_shape_mask(cls: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for ``cls`` drawn in the unit box; u (x) and v (y, downward) broadcast.

    Triangles are isosceles, apex up, base along the bottom edge (fill ratio 1/2).
    """
    inside_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if cls == "square":
        return inside_box
    if cls == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if cls == "triangle":
        return inside_box & (np.abs(u - 0.5) <= v / 2)
    raise ValueError(f"unknown shape {cls!r}")


def render(scene: Scene, size: int = 32, *, supersample: int = 4) -> np.ndarray:
    """Render ``scene`` to a uint8 (size, size, 3) RGB image (anti-aliased by supersampling)."""
    n = size * supersample
    centers = (np.arange(n) + 0.5) / n  # (n,) sample positions in image fractions
    xs, ys = centers[None, :], centers[:, None]  # (1, n) and (n, 1), broadcast to (n, n)
    canvas = np.empty((n, n, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        x0, y0 = obj.cx - obj.size / 2, obj.cy - obj.size / 2
        inside = unit_shape_mask(obj.cls, (xs - x0) / obj.size, (ys - y0) / obj.size)  # (n, n)
        canvas[inside] = PALETTE[obj.color]
    # Box-filter down: (size, ss, size, ss, 3) -> mean over each ss x ss block.
    small = canvas.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.rint(small).astype(np.uint8)


# --------------------------------------------------------------------------- datasets

_SPLIT_ID = {"train": 0, "heldout": 1}


def _split_tags(split: Split) -> tuple[Tag, ...]:
    if split not in _SPLIT_ID:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return TAGS if split == "train" else HELDOUT_TAGS


def make_dataset(
    n: int, seed: int, split: Split = "train", size: int = 32
) -> Iterator[tuple[np.ndarray, str, dict[str, Any]]]:
    """Yield ``n`` (image uint8 (size, size, 3), caption, metadata) items, tags round-robin.

    Deterministic in (n, seed, split, size); item i does not depend on n.
    """
    tags = _split_tags(split)
    rng = np.random.default_rng([seed, _SPLIT_ID[split], 0])
    for i in range(n):
        scene = sample_scene(tags[i % len(tags)], rng, split)
        yield render(scene, size), scene.caption, scene.metadata


def prompts(split: Split, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` GenEval-format metadata dicts of ``split``, tags balanced round-robin.

    Not de-duplicated: ShapesWorld has few distinct prompts per tag (3 single_object).
    """
    tags = _split_tags(split)
    rng = np.random.default_rng([seed, _SPLIT_ID[split], 1])
    return [sample_metadata(tags[i % len(tags)], rng, split) for i in range(n)]


def _mismatches(tag: Tag, params: tuple) -> list[tuple]:
    """Same-tag parameters describing scenes that a scene for ``params`` cannot satisfy."""
    if tag == "single_object":
        return [(s,) for s in SHAPES if s != params[0]]
    if tag == "two_object":
        a, b = params
        (third,) = [s for s in SHAPES if s not in params]  # absent from the scene
        return [(third, b), (a, third), (b, third), (third, a)]
    if tag == "counting":
        cls, n = params
        return [(cls, m) for m in COUNTS if m != n] + [(s, n) for s in SHAPES if s != cls]
    if tag == "colors":
        cls, color = params
        return [(cls, c) for c in COLORS if c != color]
    if tag == "position":
        a, rel, b = params
        return [(a, r, b) for r in RELATIONS if r != rel]
    if tag == "color_attr":
        ca, a, cb, b = params
        out = [(cb, a, ca, b)]  # swapped attributes: the classic binding failure
        out += [(c, a, cb, b) for c in COLORS if c not in (ca, cb)]
        out += [(ca, a, c, b) for c in COLORS if c not in (ca, cb)]
        return out
    raise ValueError(f"unknown tag {tag!r}")


def perturb_metadata(
    metadata: Mapping[str, Any], rng: np.random.Generator, split: Split | None = None
) -> dict[str, Any]:
    """A same-tag prompt that a scene laid out for ``metadata`` does *not* satisfy.

    Changes one thing (class, count, colour, relation, or swaps colours). With
    ``split`` given, the result also belongs to that split. Useful for negatives.
    """
    tag = metadata["tag"]
    cands = [build_metadata(tag, p) for p in _mismatches(tag, metadata_params(metadata))]
    if split is not None:
        cands = [md for md in cands if _in_split(md, split)]
    if not cands:
        raise ValueError(f"no {split} perturbation of {metadata['prompt']!r}")
    return cands[int(rng.integers(len(cands)))]
