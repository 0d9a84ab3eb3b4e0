"""Object detectors for GenEval-style judging, behind one interface.

A detector has ``thresholds`` (:class:`Thresholds`, passed on to :func:`.rules.judge`) and
``detect(images, metadata=None)``: a uint8 ``(H, W, 3)`` image gives a list of
:class:`~.rules.Detection`; an ``(N, H, W, 3)`` array or a list of images gives one list per image.
With ``metadata`` (one dict, or one per image) a detector that classifies colours does so for the
objects the rules will look at (see :func:`assign_colors`).

* :class:`ShapesDetector`: the exact ShapesWorld detector (``toyworlds.judge.detect``); colours
  are exact, scores are 1.
* :class:`Mask2FormerDetector`: COCO instance segmentation with
  ``transformers.Mask2FormerForUniversalSegmentation`` (hub id or local folder; GenEval's own
  model is mmdet's Mask2Former Swin-S, whose closest hub checkpoint is
  ``facebook/mask2former-swin-small-coco-instance``). Detections follow mmdet's instance
  post-processing as GenEval sees it: query x class scores (top ``num_queries``) times the mean
  mask probability, binary masks at the image's size, boxes = the masks' extents. Class names come
  from the model's ``id2label``, mapped to GenEval's names (``mouse`` -> ``computer mouse``, ...).
* :class:`CLIPColorClassifier`: GenEval's colour step. Each object is pasted over a #999 grey
  canvas through its mask, cropped to its box, and classified zero-shot by CLIP over GenEval's 10
  colours with its three templates ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}",
  "a photo of a {c} object"; text embeddings normalised, averaged per colour, renormalised;
  logits 100 * cosine). GenEval uses OpenCLIP ViT-L-14 'openai', the same network as the hub's
  ``openai/clip-vit-large-patch14``; an OpenCLIP folder loads too (``rewards.clip_family.load_clip``).

:func:`build_detector` turns a command-line spec (``shapes``, ``mask2former[=PATH]``) into one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ...errors import ConfigError
from .rules import (
    COUNTING_THRESHOLD,
    GENEVAL_COLORS,
    MAX_OBJECTS,
    NMS_IOU,
    POSITION_THRESHOLD,
    SCORE_THRESHOLD,
    Detection,
    select_detections,
)

DEFAULT_MASK2FORMER = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_COLOR_CLIP = "openai/clip-vit-large-patch14"
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {cls}",
    "a photo of a {c}-colored {cls}",
    "a photo of a {c} object",
)
BACKGROUND_GREY = (153, 153, 153)  # GenEval's bgcolor "#999"

# Label spellings of COCO checkpoints -> GenEval's object_names.txt.
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "cellphone": "cell phone",
    "doughnut": "donut",
    "teddybear": "teddy bear",
}


@dataclass(frozen=True)
class Thresholds:
    """GenEval's evaluator options (``--options``): confidence 0.3, 0.9 for counting, at most 16
    objects per class, no NMS, position margin 0.1."""

    score: float = SCORE_THRESHOLD
    counting: float = COUNTING_THRESHOLD
    max_objects: int = MAX_OBJECTS
    nms_iou: float = NMS_IOU
    position: float = POSITION_THRESHOLD

    def rules_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`.rules.judge` / :func:`.rules.select_detections`."""
        return {
            "score_threshold": self.score,
            "counting_threshold": self.counting,
            "max_objects": self.max_objects,
            "nms_iou": self.nms_iou,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Detector(Protocol):
    thresholds: Thresholds

    def detect(self, images: Any, metadata: Any = None) -> list:
        """See the module docstring."""
        ...


class ColorClassifier(Protocol):
    def classify(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> list[str]: ...


def geneval_name(label: str) -> str:
    """A checkpoint's class label in GenEval's spelling (lower case, '_'/'-' as spaces, aliases)."""
    name = re.sub(r"[_\-]+", " ", str(label)).strip().lower()
    return LABEL_ALIASES.get(name, name)


def _as_batch(images: Any) -> tuple[list[np.ndarray], bool]:
    """(list of uint8 (H, W, 3) arrays, whether the input was a single image)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images, single = [images], True
    else:
        images, single = list(images), False
    out = []
    for im in images:
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
            raise ConfigError(f"detector input: expected uint8 (H, W, 3) images, got {im.dtype} {im.shape}")
        out.append(im)
    return out, single


def _as_metadata(metadata: Any, n: int) -> list[Mapping[str, Any] | None]:
    if metadata is None:
        return [None] * n
    if isinstance(metadata, Mapping):
        return [metadata] * n
    metadata = list(metadata)
    if len(metadata) != n:
        raise ConfigError(f"detector input: {n} images but {len(metadata)} metadata dicts")
    return metadata


def assign_colors(
    image: np.ndarray,
    detections: list[Detection],
    metadata: Mapping[str, Any],
    classifier: ColorClassifier,
    thresholds: Thresholds = Thresholds(),
) -> None:
    """Fill ``Detection.color`` for the objects whose colour the rules will check.

    For each include clause with a colour these are the clause's class's ``count`` most confident
    detections that survive :func:`.rules.select_detections` (GenEval classifies exactly those).
    """
    wanted: dict[str, int] = {}
    for req in metadata.get("include", []):
        if "color" in req:
            wanted[req["class"]] = max(wanted.get(req["class"], 0), int(req["count"]))
    if not wanted:
        return
    kept = select_detections(detections, str(metadata.get("tag", "")), **thresholds.rules_kwargs())
    for cls, count in wanted.items():
        objs = [d for d in kept.get(cls, [])[:count] if d.color is None]
        if objs:
            for det, color in zip(objs, classifier.classify(image, objs, cls), strict=True):
                det.color = color


# --------------------------------------------------------------------------- ShapesWorld


class ShapesDetector:
    """The exact ShapesWorld detector (scores 1, colours from the palette)."""

    def __init__(self, thresholds: Thresholds = Thresholds(), **detect_kw: Any) -> None:
        self.thresholds = thresholds
        self.detect_kw = detect_kw

    def detect(self, images: Any, metadata: Any = None) -> list:
        from ..toyworlds.judge import detect

        batch, single = _as_batch(images)
        out = [detect(im, **self.detect_kw) for im in batch]
        return out[0] if single else out


# --------------------------------------------------------------------------- colour (CLIP)


def masked_crop(
    image: np.ndarray,
    box: Sequence[float],
    mask: np.ndarray | None,
    background: tuple[int, int, int] = BACKGROUND_GREY,
    crop: bool = True,
) -> np.ndarray:
    """GenEval's colour crop: the object over a flat background through its mask, cut to its box.

    ``box`` (x1, y1, x2, y2) is rounded to whole pixels (as PIL's ``crop`` does) and kept inside
    the image, at least one pixel wide and high. Without a mask the image is used as it is.
    """
    h, w = image.shape[:2]
    out = image
    if mask is not None:
        if mask.shape != (h, w):
            raise ValueError(f"mask shape {mask.shape} does not match the image {(h, w)}")
        out = np.where(mask[..., None].astype(bool), image, np.asarray(background, dtype=np.uint8))
    if not crop:
        return out
    x1, y1, x2, y2 = (int(round(float(v))) for v in box[:4])
    x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    x2, y2 = min(max(x2, x1 + 1), w), min(max(y2, y1 + 1), h)
    return out[y1:y2, x1:x2]


class CLIPColorClassifier:
    """Zero-shot colour of masked object crops with a CLIP model (see the module docstring)."""

    def __init__(
        self,
        path: str = DEFAULT_COLOR_CLIP,
        device: str = "cpu",
        colors: Sequence[str] = GENEVAL_COLORS,
        templates: Sequence[str] = COLOR_TEMPLATES,
        background: tuple[int, int, int] = BACKGROUND_GREY,
        crop: bool = True,
        batch_size: int = 16,
    ) -> None:
        import torch

        from ...rewards.clip_family import load_clip

        self.model, self.tokenizer, self.pre = load_clip(path, device)
        self.model.eval()
        self.device = torch.device(device)
        self.colors, self.templates = tuple(colors), tuple(templates)
        self.background, self.crop, self.batch_size = background, crop, batch_size
        self._text: dict[str, Any] = {}

    def text_classifier(self, classname: str):
        """``[K, D]`` unit vectors: per colour, the renormalised mean of its templates' embeddings."""
        import torch
        import torch.nn.functional as F

        if classname not in self._text:
            texts = [t.format(c=c, cls=classname) for c in self.colors for t in self.templates]
            ctx = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
            tok = self.tokenizer(texts, padding=True, truncation=True, max_length=ctx, return_tensors="pt")
            with torch.inference_mode():
                emb = self.model.get_text_features(
                    input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
                )
            emb = F.normalize(getattr(emb, "pooler_output", emb).float(), dim=-1)
            emb = emb.view(len(self.colors), len(self.templates), -1).mean(1)
            self._text[classname] = F.normalize(emb, dim=-1)
        return self._text[classname]

    def image_features(self, crops: Sequence[np.ndarray]):
        """``[N, D]`` unit image embeddings of uint8 crops of any sizes."""
        import torch
        import torch.nn.functional as F

        from ...rewards.clip_family import clip_preprocess

        px = [
            clip_preprocess(
                torch.from_numpy(np.ascontiguousarray(c)).permute(2, 0, 1)[None].float() / 255.0,
                self.pre["size"],
                self.pre["crop"],
                self.pre["mean"],
                self.pre["std"],
            )
            for c in crops
        ]
        out = []
        with torch.inference_mode():
            for i in range(0, len(px), self.batch_size):
                batch = torch.cat(px[i : i + self.batch_size]).to(
                    self.device, next(self.model.parameters()).dtype
                )
                emb = self.model.get_image_features(pixel_values=batch)
                out.append(getattr(emb, "pooler_output", emb).float())
        return F.normalize(torch.cat(out), dim=-1)

    def logits(self, image: np.ndarray, detections: Sequence[Detection], classname: str):
        """``[N, K]`` logits (100 * cosine) over the colours for each detection's crop."""
        crops = [masked_crop(image, d.box, d.mask, self.background, self.crop) for d in detections]
        return 100.0 * self.image_features(crops) @ self.text_classifier(classname).T

    def classify(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        return [self.colors[int(i)] for i in self.logits(image, detections, classname).argmax(1)]


class LazyColorClassifier:
    """A :class:`CLIPColorClassifier` loaded on first use (prompt sets without colours never load it)."""

    def __init__(self, path: str = DEFAULT_COLOR_CLIP, device: str = "cpu", **kw: Any) -> None:
        self.path, self.device, self.kw = path, device, kw
        self._clf: CLIPColorClassifier | None = None

    def load(self) -> CLIPColorClassifier:
        if self._clf is None:
            try:
                self._clf = CLIPColorClassifier(self.path, self.device, **self.kw)
            except OSError as e:
                raise ConfigError(
                    f"cannot load the colour classifier CLIP {self.path!r} ({type(e).__name__}); "
                    "pass a local CLIP folder with --color-clip"
                ) from None
        return self._clf

    def classify(self, image: np.ndarray, detections: Sequence[Detection], classname: str) -> list[str]:
        return self.load().classify(image, detections, classname)


# --------------------------------------------------------------------------- Mask2Former


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(x1, y1, x2, y2) extent of a bool mask, x2/y2 exclusive (mmdet's ``mask2bbox``)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


class Mask2FormerDetector:
    """COCO instance detections from a transformers Mask2Former checkpoint (see the module docstring).

    Detections scoring at most ``min(thresholds.score, thresholds.counting)`` are dropped and at
    most ``thresholds.max_objects`` are kept per class, most confident first; the rules apply the
    tag's own threshold later. ``color_classifier`` (optional) colours the objects that colour
    clauses need when ``detect`` gets metadata.
    """

    def __init__(
        self,
        path: str = DEFAULT_MASK2FORMER,
        device: str = "cpu",
        thresholds: Thresholds = Thresholds(),
        color_classifier: ColorClassifier | None = None,
        class_names: Sequence[str] | None = None,
        batch_size: int = 4,
    ) -> None:
        import torch
        from transformers import Mask2FormerForUniversalSegmentation

        from ..._quiet import quiet_libraries
        from ...rewards.base import is_local

        quiet_libraries()
        if is_local(path) and not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(
                f"Mask2Former path {path!r} is not a transformers checkpoint folder (no config.json)"
            )
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(path).to(device).eval()
            self.processor = self._load_processor(path)
        except OSError as e:
            raise ConfigError(
                f"cannot load Mask2Former from {path!r} ({type(e).__name__}); "
                "download it elsewhere and pass the local folder"
            ) from None
        id2label = self.model.config.id2label
        if class_names is not None:
            if len(class_names) != len(id2label):
                raise ConfigError(
                    f"class_names has {len(class_names)} names but the model has {len(id2label)} classes"
                )
            self.names = list(class_names)
        else:
            self.names = [geneval_name(id2label[i]) for i in range(len(id2label))]
        self.device, self.thresholds = torch.device(device), thresholds
        self.color_classifier, self.batch_size = color_classifier, batch_size

    @staticmethod
    def _load_processor(path: str):
        import transformers

        try:
            return transformers.AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError):  # no preprocessor_config.json: the COCO checkpoints' settings
            cls = (
                getattr(transformers, "Mask2FormerImageProcessorPil", None)
                or transformers.Mask2FormerImageProcessor
            )
            return cls(size={"shortest_edge": 384}, size_divisor=32, ignore_index=255, do_reduce_labels=False)

    def _raw(self, images: list[np.ndarray]) -> list[list[Detection]]:
        from types import SimpleNamespace

        import torch

        inputs = self.processor(images=images, return_tensors="pt")
        with torch.inference_mode():
            kw = {"pixel_mask": inputs["pixel_mask"].to(self.device)} if "pixel_mask" in inputs else {}
            out = self.model(pixel_values=inputs["pixel_values"].to(self.device), **kw)
        cls_logits, mask_logits = (
            out.class_queries_logits.float().cpu(),
            out.masks_queries_logits.float().cpu(),
        )
        hp, wp = inputs["pixel_values"].shape[-2:]
        floor = min(self.thresholds.score, self.thresholds.counting)
        results = []
        for i, im in enumerate(images):
            # Cut the masks to the resized image before the processor scales them, so padding
            # (batched or size_divisor) does not shift them.
            if "pixel_mask" in inputs:
                pm = inputs["pixel_mask"][i].bool()
                hv, wv = int(pm.any(1).sum()), int(pm.any(0).sum())
            else:
                hv, wv = hp, wp
            hm, wm = mask_logits.shape[-2:]
            ch, cw = max(1, round(hv * hm / hp)), max(1, round(wv * wm / wp))
            one = SimpleNamespace(
                class_queries_logits=cls_logits[i : i + 1],
                masks_queries_logits=mask_logits[i : i + 1, :, :ch, :cw],
            )
            res = self.processor.post_process_instance_segmentation(
                one, threshold=floor, target_sizes=[im.shape[:2]], return_binary_maps=True
            )[0]
            segs = res["segments_info"]
            maps = res["segmentation"]
            dets = []
            for j, seg in enumerate(segs):
                if seg["score"] <= floor:
                    continue
                mask = maps[j].numpy().astype(bool) if maps is not None and maps.ndim == 3 else None
                if mask is None:
                    mask = (maps == seg["id"]).numpy()
                dets.append(
                    Detection(
                        cls=self.names[int(seg["label_id"])],
                        score=float(seg["score"]),
                        box=mask_box(mask),
                        mask=mask,
                    )
                )
            dets.sort(key=lambda d: -d.score)
            per_class: dict[str, int] = {}
            kept = []
            for d in dets:
                per_class[d.cls] = per_class.get(d.cls, 0) + 1
                if per_class[d.cls] <= self.thresholds.max_objects:
                    kept.append(d)
            results.append(kept)
        return results

    def detect(self, images: Any, metadata: Any = None) -> list:
        batch, single = _as_batch(images)
        metas = _as_metadata(metadata, len(batch))
        out: list[list[Detection]] = []
        for s in range(0, len(batch), self.batch_size):
            out += self._raw(batch[s : s + self.batch_size])
        for im, dets, md in zip(batch, out, metas, strict=True):
            if md is not None and self.color_classifier is not None:
                assign_colors(im, dets, md, self.color_classifier, self.thresholds)
        return out[0] if single else out


# --------------------------------------------------------------------------- factory


def needs_colors(metadata: Sequence[Mapping[str, Any]]) -> bool:
    return any("color" in req for md in metadata for req in md.get("include", []))


def build_detector(
    spec: str, device: str = "cpu", color_clip: str | None = None, thresholds: Thresholds = Thresholds()
) -> Detector:
    """``shapes`` | ``mask2former`` | ``mask2former=PATH`` (hub id or folder) -> a detector.

    ``color_clip`` (hub id or folder of a CLIP checkpoint) is the colour classifier of the
    Mask2Former detector; None means GenEval's ViT-L/14 (``openai/clip-vit-large-patch14``).
    """
    name, _, path = spec.partition("=")
    if name == "shapes":
        return ShapesDetector(thresholds)
    if name == "mask2former":
        clf = LazyColorClassifier(color_clip or DEFAULT_COLOR_CLIP, device)
        return Mask2FormerDetector(path or DEFAULT_MASK2FORMER, device, thresholds, clf)
    raise ConfigError(f"unknown detector {spec!r}; valid: shapes, mask2former, mask2former=PATH")
