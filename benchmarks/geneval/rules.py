"""GenEval's judging rules, applied to a list of object detections.

Re-implementation of the decision logic of the official GenEval evaluator
(repository ``djghosh13/geneval``, file ``evaluation/evaluate_images.py``):

* ``evaluate_image``: per-class score threshold (0.3, or 0.9 for the ``counting``
  tag), sort by score, keep at most 16 objects per class, optional greedy NMS
  (off by default: ``max_overlap=1.0``)  -> :func:`select_detections`;
* ``evaluate``: include clauses are ANDed, exclude clauses ORed; colour and position
  are checked on the ``count`` most confident objects of a class  -> :func:`judge`;
* ``relative_position``: relation of box A to box B with a margin proportional to
  the boxes' sizes  -> :func:`relative_position`;
* ``summary_scores.py``: overall score = mean over tags of per-tag accuracy
  -> :func:`summarize`.

Detector-specific parts (Mask2Former, the CLIP colour classifier) are *not* here:
a detector fills ``Detection.color`` itself; :func:`judge` only compares names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Tag = Literal["single_object", "two_object", "counting", "colors", "position", "color_attr"]
Relation = Literal["left of", "right of", "above", "below"]

TAGS: tuple[Tag, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[Relation, ...] = ("left of", "right of", "above", "below")
# GenEval's colour vocabulary (its CLIP colour classifier chooses among these).
GENEVAL_COLORS: tuple[str, ...] = (
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
)

# GenEval's command-line defaults (evaluate_images.py, ``--options``).
SCORE_THRESHOLD = 0.3  # 'threshold'
COUNTING_THRESHOLD = 0.9  # 'counting_threshold' (used when tag == "counting")
MAX_OBJECTS = 16  # 'max_objects' per class
NMS_IOU = 1.0  # 'max_overlap'; 1.0 disables NMS
POSITION_THRESHOLD = 0.1  # 'position_threshold'


@dataclass(eq=False)
class Detection:
    """One detected object.

    ``box`` is (x1, y1, x2, y2) in pixels, image y growing downward; ``mask`` is an
    optional bool (H, W) array; ``color`` is a colour name or None if unknown.
    """

    cls: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    color: str | None = None


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """IoU as GenEval's ``compute_iou`` computes it (inclusive pixel coords, hence +1)."""

    def area(b: Sequence[float]) -> float:
        return max(b[2] - b[0] + 1, 0) * max(b[3] - b[1] + 1, 0)

    inter = area(
        (max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3]))
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], margin: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A relative to box B (GenEval's ``relative_position``).

    The centre offset A - B is shrunk towards 0 on each axis by
    ``margin * (size_a + size_b)`` along that axis; if nothing is left, A and B are
    in no relation. Otherwise the shrunk offset is divided by the length of the
    *original* offset and an axis counts only if that ratio exceeds 0.5 (so a
    diagonal offset can give two relations, e.g. {"left of", "above"}). On a pure
    axis the relation therefore needs |offset| > 2 * margin * (size_a + size_b).
    """
    boxes = np.asarray([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)  # (obj, corner, xy)
    center_a, center_b = boxes.mean(axis=1)  # (2,) each: (cx, cy)
    dim_a, dim_b = np.abs(boxes[:, 1] - boxes[:, 0])  # (2,) each: (w, h)
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - margin * (dim_a + dim_b), 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:  # y grows downward: negative dy means A is higher in the image
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def select_detections(
    detections: Iterable[Detection],
    tag: str,
    *,
    score_threshold: float = SCORE_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_iou: float = NMS_IOU,
) -> dict[str, list[Detection]]:
    """Group detections per class as GenEval's ``evaluate_image`` keeps them.

    Strictly-above-threshold scores only, most confident first (ties keep input
    order), at most ``max_objects`` per class, then greedy NMS unless ``nms_iou``
    is 1. Classes with nothing left are absent from the result.
    """
    threshold = counting_threshold if tag == "counting" else score_threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.score > threshold:
            by_class.setdefault(det.cls, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for cls, dets in by_class.items():
        queue = sorted(dets, key=lambda d: -d.score)[:max_objects]
        out: list[Detection] = []
        while queue:
            best = queue.pop(0)
            out.append(best)
            if nms_iou < 1:
                queue = [d for d in queue if box_iou(best.box, d.box) < nms_iou]
        kept[cls] = out
    return kept


def _color_reason(req: Mapping[str, Any], colors: list[str | None]) -> str:
    """GenEval's colour-failure message, e.g. 'expected red circle>=1, found 0 red; and 1 blue'."""
    want, cls, count = req["color"], req["class"], req["count"]
    seen = [c if c is not None else "unknown" for c in colors]
    order = list(dict.fromkeys([*GENEVAL_COLORS, *seen]))  # GenEval's order, then extras
    tally = ", ".join(f"{seen.count(c)} {c}" for c in order if c in seen)
    return f"expected {want} {cls}>={count}, found {seen.count(want)} {want}; and {tally}"


def _check_position(
    req: Mapping[str, Any],
    found: list[Detection],
    groups: list[list[Detection] | None],
    margin: float,
) -> str | None:
    """Every kept object must stand in the relation to every object of the target group."""
    relation, target = req["position"]
    cls = req["class"]
    if target >= len(groups) or groups[target] is None:
        # GenEval indexes matched_groups directly; a forward reference would raise
        # there. We treat it like a failed target instead.
        return f"no target for {cls} to be {relation}"
    for obj in found:
        for ref in groups[target]:
            rels = relative_position(obj.box, ref.box, margin)
            if relation not in rels:
                shown = " and ".join(r for r in RELATIONS if r in rels)  # sorted: deterministic
                return f"expected {cls} {relation} target, found {shown} target"
    return None


def judge(
    detections: Iterable[Detection],
    metadata: Mapping[str, Any],
    *,
    position_margin: float = POSITION_THRESHOLD,
    score_threshold: float = SCORE_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_iou: float = NMS_IOU,
) -> tuple[bool, str]:
    """Judge one image's detections against a GenEval metadata dict.

    Mirrors ``evaluate_image`` + ``evaluate`` in djghosh13/geneval
    ``evaluation/evaluate_images.py``. Returns (correct, reason) where reason joins
    GenEval-style failure messages with newlines ('' when correct).
    """
    objects = select_detections(
        detections,
        str(metadata.get("tag", "")),
        score_threshold=score_threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        nms_iou=nms_iou,
    )
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []  # per include entry: its objects if it matched
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        found = objects.get(cls, [])[:count]  # GenEval truncates before counting
        failure = None
        if len(found) < count:
            failure = f"expected {cls}>={count}, found {len(found)}"
        elif "color" in req:
            colors = [d.color for d in found]
            if colors.count(req["color"]) < count:
                failure = _color_reason(req, colors)
        if failure is None and "position" in req:
            failure = _check_position(req, found, groups, position_margin)
        if failure is not None:
            correct = False
            reasons.append(failure)
        groups.append(None if failure else found)
    for req in metadata.get("exclude", []):
        n_found = len(objects.get(req["class"], []))
        if n_found >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n_found}")
    return correct, "\n".join(reasons)


def partial_credit(
    detections: Iterable[Detection],
    metadata: Mapping[str, Any],
    *,
    position_margin: float = POSITION_THRESHOLD,
    score_threshold: float = SCORE_THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_iou: float = NMS_IOU,
) -> float:
    """The dense training reward of Flow-GRPO's GenEval setting (DiffusionNFT ``flow_grpo/gen_eval.py``
    L220-283, as described in ``../shared/reference/online-rl.md`` §8): the mean credit over the
    prompt's clauses, on the same detections ``judge`` selects:

    - count: ``max(0, 1 - |count - found| / count)`` per include entry (found = all detections of the
      class kept for this tag, so too many counts against it as too few);
    - colour: the share of the entry's ``count`` kept objects with the asked colour;
    - position: 1 when the relation holds to the target group (``judge``'s check), else 0;
    - exclude: 1 when fewer than ``count`` objects of the class were found, else 0.

    1.0 exactly when ``judge`` accepts the image (tested); evaluation stays strict (``judge``)."""
    objects = select_detections(
        detections,
        str(metadata.get("tag", "")),
        score_threshold=score_threshold,
        counting_threshold=counting_threshold,
        max_objects=max_objects,
        nms_iou=nms_iou,
    )
    credits: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, count = req["class"], req["count"]
        every = objects.get(cls, [])
        found = every[:count]
        exact = len(found) >= count
        credits.append(max(0.0, 1.0 - abs(count - len(every)) / count) if count else 1.0)
        if "color" in req:
            right = [d.color for d in found].count(req["color"])
            credits.append(right / count)
            exact = exact and right >= count
        if "position" in req:
            ok = exact and _check_position(req, found, groups, position_margin) is None
            credits.append(float(ok))
            exact = ok
        groups.append(found if exact else None)
    for req in metadata.get("exclude", []):
        credits.append(float(len(objects.get(req["class"], [])) < req["count"]))
    return float(np.mean(credits)) if credits else 1.0


def summarize(results: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of per-image results (each with 'tag' and 'correct').

    Returns ``overall`` (mean over tags of per-tag accuracy, GenEval's headline
    score), ``per_tag`` accuracies, ``n_per_tag``, ``images`` (fraction of correct
    images) and, when results carry 'metadata' or 'prompt', ``prompts`` (fraction of
    prompts with at least one correct image).
    """
    per_tag: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    for r in results:
        ok = bool(r["correct"])
        per_tag.setdefault(str(r["tag"]), []).append(ok)
        key = r.get("metadata", r.get("prompt"))
        if key is not None:
            key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
            per_prompt[key] = per_prompt.get(key, False) or ok
    if not per_tag:
        return {"overall": float("nan"), "per_tag": {}, "n_per_tag": {}, "images": float("nan")}
    acc = {tag: float(np.mean(v)) for tag, v in per_tag.items()}
    every = [ok for v in per_tag.values() for ok in v]
    out: dict[str, Any] = {
        "overall": float(np.mean(list(acc.values()))),
        "per_tag": acc,
        "n_per_tag": {tag: len(v) for tag, v in per_tag.items()},
        "images": float(np.mean(every)),
    }
    if per_prompt:
        out["prompts"] = float(np.mean(list(per_prompt.values())))
    return out
