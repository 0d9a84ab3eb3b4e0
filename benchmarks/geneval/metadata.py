"""GenEval prompt metadata: read, check, write, and generate prompt sets.

Format (``prompts/evaluation_metadata.jsonl`` of djghosh13/geneval): one JSON object per line with
``tag``, ``prompt``, ``include`` (a list of ``{"class", "count", optional "color", optional
"position": [relation, group_index]}``) and optional ``exclude`` (a list of ``{"class", "count"}``).
:func:`read_metadata` checks every row and reports a bad one as a single line naming the file and
line (:class:`MetadataError`, a :class:`~diffalign.errors.ConfigError`).

Prompt sets:

* :func:`geneval_prompts` builds a GenEval-style suite from GenEval's templates over a class list
  (default: the 80 COCO names in GenEval's ``object_names.txt`` order) and its 10 colours, drawing
  with the same procedure and random-number calls as GenEval's ``prompts/create_prompts.py``
  (single_object covers every class; ``n`` draws for each other tag; exact duplicates dropped).
  With the defaults (n=100, seed 43) this reproduces the published 553-prompt file, order included.
* :func:`shapes_prompts` gives ShapesWorld prompts (same format; the toy world's own classes and
  colours), see :mod:`diffalign.benchmarks.toyworlds.shapes`.
* :func:`read_prompt_rows` reads plain prompt files for reward-only evaluations as ``{prompt, category}``
  rows (unlike :func:`diffalign.synpic.read_prompts`, which reads a training prompt list and refuses
  repeats): ``.txt`` (one per
  line), ``.jsonl`` (``prompt``/``caption``), ``.json`` (the HPSv2 benchmark's list of strings, or
  a list of objects) and ``.tsv``/``.csv`` (PartiPrompts' ``Prompt`` and ``Category`` columns).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError
from .rules import GENEVAL_COLORS, RELATIONS, TAGS

# GenEval's evaluation/object_names.txt: COCO's 80 thing classes in detector index order, with
# three renamed (mouse -> computer mouse, remote -> tv remote, keyboard -> computer keyboard).
COCO_CLASSES: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)
NUMBER_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)
_INCLUDE_KEYS = {"class", "count", "color", "position"}
_EXCLUDE_KEYS = {"class", "count"}


class MetadataError(ConfigError):
    """A bad metadata or prompt row; the message names the file and line."""


# --------------------------------------------------------------------------- checking


def _check_count(entry: Mapping[str, Any], what: str) -> str | None:
    if not isinstance(entry.get("class"), str) or not entry["class"]:
        return f"{what} needs a non-empty 'class' string"
    count = entry.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        return f"{what} ({entry['class']!r}) needs an integer 'count' >= 1, got {count!r}"
    return None


def check_metadata(md: Any) -> str | None:  # noqa: C901 (one branch per metadata rule)
    """Why ``md`` is not a valid GenEval metadata dict, or None if it is."""
    if not isinstance(md, dict):
        return f"expected a JSON object, got {type(md).__name__}"
    for key in ("tag", "prompt"):
        if not isinstance(md.get(key), str) or not md[key].strip():
            return f"needs a non-empty {key!r} string"
    include = md.get("include")
    if not isinstance(include, list) or not include:
        return "needs a non-empty 'include' list"
    for i, req in enumerate(include):
        what = f"include[{i}]"
        if not isinstance(req, dict):
            return f"{what} must be an object"
        if extra := sorted(set(req) - _INCLUDE_KEYS):
            return (
                f"{what} has unknown key(s) {', '.join(map(repr, extra))} "
                "(valid: class, count, color, position)"
            )
        if why := _check_count(req, what):
            return why
        if "color" in req and (not isinstance(req["color"], str) or not req["color"]):
            return f"{what} 'color' must be a colour name, got {req['color']!r}"
        if "position" in req:
            pos = req["position"]
            if not (
                isinstance(pos, list | tuple)
                and len(pos) == 2
                and pos[0] in RELATIONS
                and isinstance(pos[1], int)
                and not isinstance(pos[1], bool)
            ):
                return (
                    f"{what} 'position' must be [relation, group index] with relation in "
                    f"{list(RELATIONS)}, got {pos!r}"
                )
            if not 0 <= pos[1] < i:
                return (
                    f"{what} 'position' refers to include[{pos[1]}]; "
                    f"it must name an earlier entry (0..{i - 1})"
                )
    exclude = md.get("exclude", [])
    if not isinstance(exclude, list):
        return "'exclude' must be a list"
    for i, req in enumerate(exclude):
        what = f"exclude[{i}]"
        if not isinstance(req, dict):
            return f"{what} must be an object"
        if extra := sorted(set(req) - _EXCLUDE_KEYS):
            return f"{what} has unknown key(s) {', '.join(map(repr, extra))} (valid: class, count)"
        if why := _check_count(req, what):
            return why
    return None


def _read_text(p: Path) -> str:
    """A text file's contents; a binary or non-UTF-8 file is a one-line error naming the file and line."""
    data = p.read_bytes()
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise MetadataError(f"{p}:{line}: holds NUL bytes: a binary file, not prompts text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MetadataError(
            f"{p}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8 (a binary file cannot "
            "hold prompts)"
        ) from None


def read_metadata(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a GenEval ``evaluation_metadata.jsonl`` (blank lines skipped), each checked."""
    p = Path(path)
    if not p.is_file():
        raise MetadataError(f"metadata file {str(path)!r} does not exist")
    rows = []
    for ln, line in enumerate(_read_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            md = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{p}:{ln}: not valid JSON ({e.msg} at column {e.colno})") from None
        if why := check_metadata(md):
            raise MetadataError(f"{p}:{ln}: {why}")
        rows.append(md)
    if not rows:
        raise MetadataError(f"metadata file {str(path)!r} has no rows")
    return rows


def write_metadata(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write GenEval jsonl (one compact JSON object per line, keys in the given order)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(p)
    return p


# --------------------------------------------------------------------------- plain prompt files


def _prompt_of(rec: Mapping[str, Any]) -> Any:
    for key in ("prompt", "Prompt", "caption", "text"):
        if key in rec:
            return rec[key]
    return None


def read_prompt_rows(path: str | Path) -> list[dict[str, Any]]:  # noqa: C901 (one branch per file format)
    """Prompt rows ``{"prompt", "category"}`` from a .txt/.jsonl/.json/.tsv/.csv file.

    ``category`` is the row's ``Category``/``category`` column where there is one (PartiPrompts),
    otherwise the file's stem (an HPSv2 benchmark style file such as ``anime.json``).
    """
    p = Path(path)
    if not p.is_file():
        raise MetadataError(f"prompts file {str(path)!r} does not exist")
    text = _read_text(p)
    raw: list[tuple[int, Any]] = []  # (line or item number, record)
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise MetadataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise MetadataError(f"{p}: expected a JSON list of prompts (HPSv2 benchmark style)")
        raw = list(enumerate(data, start=1))
    elif suffix in (".tsv", ".csv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames or not ({"Prompt", "prompt", "caption", "text"} & set(reader.fieldnames)):
            raise MetadataError(
                f"{p}:1: needs a 'Prompt' (or 'prompt'/'caption') column, found {reader.fieldnames}"
            )
        raw = [(i + 2, row) for i, row in enumerate(reader)]
    else:
        for ln, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    raw.append((ln, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise MetadataError(f"{p}:{ln}: not valid JSON ({e.msg} at column {e.colno})") from None
            else:
                raw.append((ln, line.strip()))
    rows = []
    where = "item" if suffix == ".json" else "line"
    for n, rec in raw:
        prompt, category = (rec, p.stem) if isinstance(rec, str) else (None, p.stem)
        if isinstance(rec, dict):
            prompt = _prompt_of(rec)
            category = rec.get("Category", rec.get("category", p.stem))
        if not isinstance(prompt, str) or not prompt.strip():
            raise MetadataError(
                f"{p}:{n}: {where} {n} has no prompt (a string, or an object with 'prompt'/'caption')"
            )
        rows.append({"prompt": prompt.strip(), "category": str(category)})
    if not rows:
        raise MetadataError(f"prompts file {str(path)!r} has no prompts")
    return rows


# --------------------------------------------------------------------------- generating


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def geneval_prompts(
    n: int = 100,
    seed: int = 43,
    classes: Sequence[str] = COCO_CLASSES,
    colors: Sequence[str] = GENEVAL_COLORS,
    max_count: int = 4,
    no_color_class: str | None = "person",
) -> list[dict[str, Any]]:
    """A GenEval-style prompt suite built from GenEval's templates.

    All classes once as ``single_object``; ``n`` random draws each of ``two_object``, ``counting``
    (2..``max_count``, with GenEval's exactness ``exclude``), ``colors``, ``position`` and
    ``color_attr``; exact duplicates dropped (first kept). ``no_color_class`` (GenEval: "person")
    never receives a colour. Same draw order as GenEval's ``create_prompts.py``, so the defaults
    give GenEval's own file.
    """
    classes = list(classes)
    colors = list(colors)
    if len(classes) < 2 or len(colors) < 2:
        raise ConfigError("geneval_prompts needs at least two classes and two colours")
    rng = np.random.default_rng(seed)
    k = len(classes)
    # Colour prompts draw among the other classes, counted from the one that takes no colour.
    skip = classes.index(no_color_class) if no_color_class in classes else None

    def colorable(idx: np.ndarray | int) -> Any:
        return idx if skip is None else (idx + 1 + skip) % k

    def md(
        tag: str, include: list[dict[str, Any]], prompt: str, exclude: list | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"tag": tag, "include": include}
        if exclude:
            out["exclude"] = exclude
        out["prompt"] = f"a photo of {prompt}"
        return out

    samples = [
        md("single_object", [{"class": classes[i], "count": 1}], with_article(classes[i]))
        for i in rng.choice(k, size=k, replace=False)
    ]
    for _ in range(n):
        a, b = (classes[i] for i in rng.choice(k, size=2, replace=False))
        samples.append(
            md(
                "two_object",
                [{"class": a, "count": 1}, {"class": b, "count": 1}],
                f"{with_article(a)} and {with_article(b)}",
            )
        )
    for _ in range(n):
        cls = classes[rng.choice(k)]
        num = int(rng.integers(2, max_count, endpoint=True))
        samples.append(
            md(
                "counting",
                [{"class": cls, "count": num}],
                f"{NUMBER_WORDS[num]} {make_plural(cls)}",
                [{"class": cls, "count": num + 1}],
            )
        )
    n_col = k - (skip is not None)
    for _ in range(n):
        cls = classes[colorable(int(rng.choice(n_col)))]
        color = colors[rng.choice(len(colors))]
        samples.append(
            md("colors", [{"class": cls, "count": 1, "color": color}], f"{with_article(color)} {cls}")
        )
    for _ in range(n):
        a, b = (classes[i] for i in rng.choice(k, size=2, replace=False))
        rel = RELATIONS[rng.choice(len(RELATIONS))]
        samples.append(
            md(
                "position",
                [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}],
                f"{with_article(a)} {rel} {with_article(b)}",
            )
        )
    for _ in range(n):
        a, b = (classes[int(i)] for i in colorable(rng.choice(n_col, size=2, replace=False)))
        ca, cb = (colors[i] for i in rng.choice(len(colors), size=2, replace=False))
        samples.append(
            md(
                "color_attr",
                [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                f"{with_article(ca)} {a} and {with_article(cb)} {b}",
            )
        )
    seen: set[str] = set()
    unique = []
    for s in samples:
        key = json.dumps(s, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


# Draws of ShapesWorld's prompt stream that surely hold every prompt of a split (each split has 120;
# the rarest held-out ones turn up once in ~540 draws, so 20000 draws miss one with odds below 1e-13).
EXHAUSTIVE_DRAWS = 20_000


def shapes_prompts(split: str = "heldout", n: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` *distinct* ShapesWorld prompts of ``split`` (GenEval format): the first ``n`` distinct ones
    of ``toyworlds.shapes.prompts``' seeded, tag-round-robin stream. A tag whose few prompts are all
    taken stops contributing and the others fill the rest (held out, 60 prompts: 2 two-object, 2
    counting, 4 colours, 4 positions, 48 colour-attribution). When ``n`` exceeds what the split holds
    (120 per split), all of them, fewer than ``n``: callers say so."""
    from ..toyworlds.shapes import prompts

    if split not in ("train", "heldout"):
        raise ConfigError(f"toy split must be 'train' or 'heldout', got {split!r}")
    seen: dict[str, dict[str, Any]] = {}
    for draws in dict.fromkeys((40 * n, max(40 * n, EXHAUSTIVE_DRAWS))):  # a short stream first
        seen = {}
        for md in prompts(split, draws, seed):  # type: ignore[arg-type]
            seen.setdefault(md["prompt"], md)
            if len(seen) == n:
                return list(seen.values())
    return list(seen.values())


def tag_counts(rows: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Number of prompts per tag, GenEval's six tags first."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["tag"]] = counts.get(r["tag"], 0) + 1
    order = [t for t in TAGS if t in counts] + sorted(t for t in counts if t not in TAGS)
    return {t: counts[t] for t in order}
