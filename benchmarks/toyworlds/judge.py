"""Exact programmatic detector and judge for ShapesWorld images.

Pipeline of :func:`detect`:

1. Per-pixel colour. Each palette colour c defines the segment from the background
   to c; an anti-aliased edge, a faded or a blurred colour lies on or near it, and
   its position along the segment is c's coverage of the pixel. A pixel takes the
   colour whose segment is nearest; it is foreground only if that distance is below
   ``max_dist`` and its coverage is at least 0.5.
2. Objects. 8-connected components of foreground; a component's colour is the
   majority colour of its pixels, unless it has two or more substantial colours
   (touching shapes in a generated image), in which case it is split by colour.
   Objects below ``min_area`` pixels are dropped (noise, stray edge pixels).
3. Shape, by analysis-by-synthesis on the colour's coverage around the object
   (pixels up to 2 px away that are nearer to it than to any other object):
   circle, square and triangle (4 orientations) hypotheses take their size from
   the coverage's second moments and their place from its centroid, optionally
   blurred by a few Gaussian widths, are rendered the way ShapesWorld renders, and
   are scored by soft IoU with the coverage. Hypotheses stretched beyond
   ``MAX_ASPECT`` are skipped, and objects whose best soft IoU is below ``min_iou``
   are not reported (blobs that are no recognisable shape).

Detections have score 1.0 (the detector has no graded confidence, and a lower score
would interact with GenEval's 0.9 counting threshold) and are listed largest first,
the order in which GenEval's rules take "the most confident" objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from ..geneval.rules import Detection, judge
from .shapes import BACKGROUND, COLORS, PALETTE, unit_shape_mask

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity structuring element
_BG = np.asarray(BACKGROUND, dtype=np.float32)  # (3,)
_DIRS = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32) - _BG  # (K, 3)
_SS = 4  # supersampling of hypothesis renders, as in shapes.render
_REGION_PX = 2.0  # how far around an object its coverage is collected
BLURS_PX = (0.0, 0.6, 1.0)  # Gaussian blur widths tried when fitting shapes
MAX_ASPECT = 1.5  # true shapes have aspect 1; allow generated ones some stretch

Template = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PixelColors(NamedTuple):
    """Per-pixel colour analysis of an (H, W, 3) image (K = number of palette colours)."""

    labels: np.ndarray  # (H, W) int: palette index of foreground pixels, -1 elsewhere
    nearest: np.ndarray  # (H, W) int: palette index of the nearest segment, unthresholded
    alpha: np.ndarray  # (H, W, K) float: position along each background->colour segment


def pixel_colors(image: np.ndarray, max_dist: float = 70.0) -> PixelColors:
    """Palette labels and coverages of a uint8 (H, W, 3) image (see module docstring)."""
    v = image.astype(np.float32) - _BG  # (H, W, 3) offset from the background
    alpha = v @ _DIRS.T / np.einsum("kc,kc->k", _DIRS, _DIRS)  # (H, W, K)
    # Up to 1.5: more saturated or darker versions of a colour still match it.
    proj = np.clip(alpha, 0.0, 1.5)[..., None] * _DIRS  # (H, W, K, 3)
    dist = np.linalg.norm(v[..., None, :] - proj, axis=-1)  # (H, W, K)
    nearest = dist.argmin(axis=-1)  # (H, W)
    near_dist = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]
    near_alpha = np.take_along_axis(alpha, nearest[..., None], -1)[..., 0]
    labels = np.where((near_dist < max_dist) & (near_alpha >= 0.5), nearest, -1)
    return PixelColors(labels, nearest, alpha)


def _triangle(flip: bool, sideways: bool) -> Template:
    """Triangle template; apex up by default, down if ``flip``, left/right if ``sideways``."""

    def template(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        a, b = (v, u) if sideways else (u, v)
        return unit_shape_mask("triangle", a, 1 - b if flip else b)

    return template


# (class, template in the unit box, (k_x, k_y), (o_x, o_y)): box side = k * standard
# deviation of the shape's area along that axis (ellipse w/4, rectangle w/sqrt(12),
# triangle base/sqrt(24) and height/sqrt(18)); box centre = centroid - o * box side.
_HYPOTHESES: tuple[tuple[str, Template, tuple[float, float], tuple[float, float]], ...] = (
    ("circle", lambda u, v: unit_shape_mask("circle", u, v), (4.0, 4.0), (0.0, 0.0)),
    ("square", lambda u, v: unit_shape_mask("square", u, v), (12**0.5, 12**0.5), (0.0, 0.0)),
    ("triangle", _triangle(False, False), (24**0.5, 18**0.5), (0.0, 1 / 6)),  # apex up
    ("triangle", _triangle(True, False), (24**0.5, 18**0.5), (0.0, -1 / 6)),  # apex down
    ("triangle", _triangle(False, True), (18**0.5, 24**0.5), (1 / 6, 0.0)),  # apex left
    ("triangle", _triangle(True, True), (18**0.5, 24**0.5), (-1 / 6, 0.0)),  # apex right
)


def _render_patch(
    template: Template, box: tuple[float, float, float, float], shape: tuple[int, int]
) -> np.ndarray:
    """Coverage (h, w) of ``template`` drawn in the pixel box (x1, y1, x2, y2)."""
    h, w = shape
    xs = ((np.arange(w * _SS) + 0.5) / _SS)[None, :]  # (1, w*ss) sample x in pixels
    ys = ((np.arange(h * _SS) + 0.5) / _SS)[:, None]  # (h*ss, 1)
    x1, y1, x2, y2 = box
    inside = template((xs - x1) / (x2 - x1), (ys - y1) / (y2 - y1))  # (h*ss, w*ss)
    return inside.reshape(h, _SS, w, _SS).mean(axis=(1, 3))


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix M with M @ x = 1-D Gaussian blur of x (zero outside, 4-sigma kernel)."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]  # (n, n) offsets
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    m = np.exp(-0.5 * (d / sigma) ** 2) / kernel.sum()
    return np.where(np.abs(d) <= radius, m, 0.0)


def fit_shape(
    coverage: np.ndarray,
    blurs: tuple[float, ...] = BLURS_PX,
    good_enough: float = 0.9,
    max_aspect: float = MAX_ASPECT,
) -> tuple[str, float, tuple[float, float, float, float]]:
    """Best shape hypothesis for one object's coverage map (h, w), values in [0, 1].

    Blur widths are tried in order; once a fit reaches soft IoU ``good_enough``
    the remaining (wider) blurs are skipped: a sharp render is explained sharply.
    Hypotheses elongated beyond ``max_aspect`` are not shapes of this world (a bar
    is no square); if all are, the soft IoU returned is -1.
    Returns (class, soft IoU, fitted box (x1, y1, x2, y2) in patch pixels).
    """
    h, w = coverage.shape
    total = coverage.sum()
    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, (h, w) each
    mx, my = (coverage * xs).sum() / total, (coverage * ys).sum() / total
    # +1/12: the variance of a uniform pixel, lost by sampling at pixel centres.
    var_x = (coverage * (xs - mx) ** 2).sum() / total + 1 / 12
    var_y = (coverage * (ys - my) ** 2).sum() / total + 1 / 12
    best = ("square", -1.0, (0.0, 0.0, float(w), float(h)))
    for blur in blurs:
        if best[1] >= good_enough:
            break
        if min(var_x, var_y) - blur**2 < 0.5:  # blur would explain (nearly) all the size
            continue
        sx, sy = np.sqrt(var_x - blur**2), np.sqrt(var_y - blur**2)
        if blur:
            blur_y, blur_x = _blur_matrix(h, blur), _blur_matrix(w, blur)
        for cls, template, (kx, ky), (ox, oy) in _HYPOTHESES:
            bw, bh = kx * sx, ky * sy
            if max(bw / bh, bh / bw) > max_aspect:
                continue
            cx, cy = mx - ox * bw, my - oy * bh
            box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
            pred = _render_patch(template, box, (h, w))  # (h, w)
            if blur:
                pred = blur_y @ pred @ blur_x.T
            iou = float(np.minimum(pred, coverage).sum() / np.maximum(pred, coverage).sum())
            if iou > best[1]:
                best = (cls, iou, tuple(float(b) for b in box))
    return best


def _split_by_color(comp: np.ndarray, labels: np.ndarray, min_area: int) -> list[tuple[np.ndarray, int]]:
    """(mask (H, W) bool, colour index) objects in one connected component."""
    counts = np.bincount(labels[comp], minlength=len(COLORS))  # (K,)
    major = [k for k in range(len(COLORS)) if counts[k] >= max(min_area, 0.3 * counts.sum())]
    if len(major) <= 1:  # one object; stray edge colours are absorbed by the majority
        return [(comp, int(counts.argmax()))]
    parts = []
    for k in major:
        sub, n = ndimage.label(comp & (labels == k), structure=_EIGHT)
        parts += [(sub == i, k) for i in range(1, n + 1)]
    return parts


def _segment(px: PixelColors, min_area: int) -> list[tuple[np.ndarray, int]]:
    """Objects as (hole-filled mask (H, W) bool, colour index), each >= min_area pixels."""
    comps, n = ndimage.label(px.labels >= 0, structure=_EIGHT)
    objects = []
    for i in range(1, n + 1):
        comp = comps == i
        if comp.sum() >= min_area:
            objects += [
                (ndimage.binary_fill_holes(m), k)
                for m, k in _split_by_color(comp, px.labels, min_area)
                if m.sum() >= min_area
            ]
    return objects


def _fit_object(
    mask: np.ndarray, color: int, owned: np.ndarray, px: PixelColors, min_iou: float
) -> Detection | None:
    """Fit a shape to an object's colour coverage over the pixels it owns (both (H, W) bool)."""
    region = mask | (owned & (px.nearest == color))
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    # Two pixels of zero padding so blurred hypotheses can spill over the edge.
    coverage = np.pad(np.where(region, np.clip(px.alpha[..., color], 0, 1), 0)[y0:y1, x0:x1], 2)
    cls, iou, (bx1, by1, bx2, by2) = fit_shape(coverage)
    if iou < min_iou:
        return None
    box = (float(bx1 + x0 - 2), float(by1 + y0 - 2), float(bx2 + x0 - 2), float(by2 + y0 - 2))
    return Detection(cls=cls, score=1.0, box=box, mask=mask, color=COLORS[color])


def detect(
    image: np.ndarray,
    *,
    max_dist: float = 70.0,
    min_area: int | None = None,
    min_iou: float = 0.7,
) -> list[Detection]:
    """Detect shapes in a uint8 (H, W, 3) RGB image; largest first, all with score 1.

    ``min_area`` defaults to H*W/128 pixels (8 at 32x32; the smallest true shape,
    a 7 px triangle, covers about 24). Boxes are the fitted shapes' boxes
    (sub-pixel, image y downward); masks are the thresholded, hole-filled pixels.
    """
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    h, w = image.shape[:2]
    min_area = max(4, round(h * w / 128)) if min_area is None else min_area
    px = pixel_colors(image, max_dist)
    objects = _segment(px, min_area)
    if not objects:
        return []
    ids = np.zeros((h, w), dtype=np.int32)  # (H, W): 1 + object index, 0 = none
    for j, (mask, _) in enumerate(objects):
        ids[mask] = j + 1
    # Each pixel's nearest object, so coverage near two objects is not counted twice.
    dist, (iy, ix) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
    owner = np.where(dist <= _REGION_PX, ids[iy, ix], 0)  # (H, W)
    found = [
        det
        for j, (mask, k) in enumerate(objects)
        if (det := _fit_object(mask, k, owner == j + 1, px, min_iou)) is not None
    ]
    # Largest first; ties top-to-bottom, left-to-right (deterministic).
    found.sort(key=lambda d: (-int(d.mask.sum()), d.box[1], d.box[0]))
    return found


def judge_image(image: np.ndarray, metadata: Mapping[str, Any], **rules_kwargs: Any) -> tuple[bool, str]:
    """Judge a ShapesWorld image against GenEval metadata: rules.judge(detect(image), metadata)."""
    return judge(detect(image), metadata, **rules_kwargs)
