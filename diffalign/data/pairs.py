"""Preference-pair datasets: Pick-a-Pic v2 parquet, ``datasets`` ids, JSONL and folders.

Every source is reduced to an index of rows ``(caption, winner image, loser image)``, winner
first. Policies, all counted and reported in one summary line:

- ties (``label_0 == 0.5``) are dropped by default (official Diffusion-DPO), else ``jpg_0`` wins;
- empty captions are skipped;
- a ``label_0`` outside {0, 0.5, 1} or a missing column is an error naming the file and row;
- an undecodable image is skipped at read time: the item is replaced by the next readable pair
  (so the batch size, and with it every invariant, is kept) and counted in ``data/skipped``.

Images are read lazily (parquet: one row group at a time, a small LRU cache), so memory stays
flat as the dataset grows. Augmentation is joint: the loser is resized to the winner's size,
then both get the same resize, crop and flip. Randomness comes from a per-sample seed handed in
by the sampler, so an item is the same whatever the batch size, worker count or resume point.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import ConfigError, DataConfig
from .media import DECODE_ERRORS, decode_media, media_tensors

PICKAPIC_REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0")
VALID_LABELS = (0.0, 0.5, 1.0)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".wav")  # .png may be a video film strip


class DataError(ConfigError):
    """Bad input data; the message names the file, row and key."""


@dataclass
class PairRow:
    caption: str
    source: int
    """Index into the dataset's list of files/sources."""
    row: int
    """Row inside that source."""
    swap: bool
    """True when ``label_0 == 0``: image 1 is the winner."""
    captions: tuple[str, str] | None = None
    """Per-image captions (``caption_0``, ``caption_1``) when the data has them (DCPO)."""
    scores: tuple[float, float] | None = None
    """Per-image reward scores (``data.score_column``), in file order like ``captions``."""


# ----------------------------------------------------------------------------- source detection


def detect_format(dcfg: DataConfig) -> str:
    if dcfg.format != "auto":
        return dcfg.format
    p = Path(dcfg.path).expanduser()
    if p.is_file():
        if p.suffix == ".parquet":
            return "parquet"
        if p.suffix in (".jsonl", ".json"):
            return "jsonl"
        raise DataError(
            f"data.path {dcfg.path!r}: unknown file type {p.suffix!r} (expected .parquet or .jsonl)"
        )
    if p.is_dir():
        if (p / "chosen").is_dir() and (p / "rejected").is_dir():
            return "folder"
        if any(p.rglob("*.parquet")):
            return "parquet"
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            return "hf"
        raise DataError(
            f"data.path {dcfg.path!r}: folder has no *.parquet files and no chosen/ + rejected/ subfolders"
        )
    if dcfg.path.count("/") == 1 and not dcfg.path.startswith((".", "/", "~")):
        return "hf"  # a hub dataset id
    raise DataError(f"data.path {dcfg.path!r} does not exist")


def parquet_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(p.rglob("*.parquet"))
    if not files:
        raise DataError(f"data.path {path!r}: no parquet files found")
    return files


def check_columns(f: Path, required: tuple[str, ...], schema: str) -> None:
    """One-line error naming the file and the first missing column."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(f).names
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid (a ValueError): truncated or not parquet
        raise DataError(f"{f}: not a readable parquet file ({' '.join(str(e).split())[:160]})") from None
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"{f}: missing column {missing[0]!r} ({schema} schema "
            f"needs {', '.join(required)}; found {', '.join(names)})"
        )


def check_source(dcfg: DataConfig) -> None:
    """Cheap pre-flight check run by ``validate``: the path exists and has the needed columns."""
    if not dcfg.path:
        raise DataError(
            "data.path is empty: give a parquet file/folder, a JSONL file, a pairs folder or a dataset id"
        )
    fmt = detect_format(dcfg)
    if fmt in ("ranked", "parquet"):
        from .ranked import RANKED_REQUIRED

        required, schema = (
            (RANKED_REQUIRED, "ranked") if fmt == "ranked" else (PICKAPIC_REQUIRED, "Pick-a-Pic")
        )
        for f in parquet_files(dcfg.path):
            check_columns(f, required, schema)
    elif fmt == "jsonl":
        p = Path(dcfg.path).expanduser()
        if not p.is_file():
            raise DataError(f"data.path {dcfg.path!r} does not exist")
        _index_jsonl(dcfg, _Counts())  # every row's JSON, keys, label and paths (not the images)
    elif fmt == "hf":
        check_hub_dataset(dcfg.path)


def check_hub_dataset(path: str) -> None:
    """A ``datasets`` source: the package is installed, and a hub id is reachable (offline: cached)."""
    import importlib.util

    if importlib.util.find_spec("datasets") is None:
        raise DataError("data.format 'hf' needs the datasets package: pip install 'diffalign[hf]'")
    if Path(path).expanduser().exists():
        return
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return  # online: the hub answers at load time (errors there are one line too, see _index_hf)
    try:
        snapshot_download(path, repo_type="dataset", local_files_only=True)
    except Exception:  # LocalEntryNotFoundError, or an id the cache cannot even name
        raise DataError(
            f"data.path {path!r} is a hub dataset id, HF_HUB_OFFLINE is set and it is not in the local "
            "cache; download it once online, or point data.path at a save_to_disk folder or parquet files"
        ) from None


# ----------------------------------------------------------------------------- readers


class ParquetImages:
    """Lazy image bytes from parquet files, one row group at a time (LRU of a few groups)."""

    def __init__(
        self, files: list[Path], cache_groups: int = 4, columns: tuple[str, ...] = ("jpg_0", "jpg_1")
    ) -> None:
        self.files = files
        self.cache_groups = cache_groups
        self.columns = columns
        self._handles: dict[int, Any] = {}
        self._offsets: dict[int, np.ndarray] = {}
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # workers reopen files themselves
        return {"files": self.files, "cache_groups": self.cache_groups, "columns": self.columns}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["files"], state["cache_groups"], state["columns"])

    def _file(self, i: int):
        import pyarrow.parquet as pq

        if i not in self._handles:
            pf = pq.ParquetFile(self.files[i])
            self._handles[i] = pf
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            self._offsets[i] = np.cumsum([0] + sizes)
        return self._handles[i]

    def get(self, source: int, row: int) -> tuple[Any, ...]:
        pf = self._file(source)
        offs = self._offsets[source]
        g = int(np.searchsorted(offs, row, side="right") - 1)
        key = (source, g)
        if key not in self._cache:
            self._cache[key] = pf.read_row_group(g, columns=list(self.columns))
            if len(self._cache) > self.cache_groups:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        tbl = self._cache[key]
        r = row - int(offs[g])
        return tuple(tbl.column(c)[r].as_py() for c in self.columns)


def _check_label(value: Any, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: label_0={value!r} is not one of 0, 0.5, 1") from None
    if v not in VALID_LABELS:
        raise DataError(f"{where}: label_0={value!r} is not one of 0, 0.5, 1")
    return v


class _Counts:
    def __init__(self) -> None:
        self.ties = 0
        self.empty_caption = 0

    def summary(self, kept: int, name: str) -> str:
        return (
            f"{name}: {kept} pairs kept; dropped {self.ties} ties, "
            f"skipped {self.empty_caption} empty captions"
        )


def _index_parquet(dcfg: DataConfig, counts: _Counts) -> tuple[list[PairRow], ParquetImages]:
    import pyarrow.parquet as pq

    files = parquet_files(dcfg.path)
    rows: list[PairRow] = []
    for si, f in enumerate(files):
        check_columns(f, PICKAPIC_REQUIRED, "Pick-a-Pic")
        names = set(pq.read_schema(f).names)
        dual = {"caption_0", "caption_1"} <= names
        score_cols = _score_columns(dcfg.score_column, names, f) if dcfg.score_column else []
        cols = ["caption", "label_0"] + (["caption_0", "caption_1"] if dual else []) + score_cols
        tbl = pq.read_table(f, columns=cols)  # light columns only
        c0 = tbl.column("caption_0").to_pylist() if dual else None
        c1 = tbl.column("caption_1").to_pylist() if dual else None
        sc = [tbl.column(c).to_pylist() for c in score_cols]
        for r, (cap, lab) in enumerate(
            zip(tbl.column("caption").to_pylist(), tbl.column("label_0").to_pylist(), strict=True)
        ):
            scores = _check_scores(sc[0][r], sc[1][r], f"{f} row {r}", score_cols) if sc else None
            _add_row(
                rows,
                counts,
                dcfg,
                cap,
                _check_label(lab, f"{f} row {r}"),
                si,
                r,
                (c0[r], c1[r]) if dual else None,
                scores,
            )
    return rows, ParquetImages(files)


def _score_columns(name: str, names: set[str], f: Any) -> list[str]:
    for pair in ([f"{name}_0", f"{name}_1"], [f"score_0.{name}", f"score_1.{name}"]):
        if set(pair) <= names:
            return pair
    have = sorted(n for n in names if "score" in n) or ["none"]
    raise DataError(
        f"{f}: data.score_column={name!r} needs columns {name}_0/{name}_1 or score_0.{name}/score_1.{name}; "
        f"score columns present: {', '.join(have)}"
    )


def _check_scores(a: Any, b: Any, where: str, cols: list[str]) -> tuple[float, float]:
    try:
        out = (float(a), float(b))
    except (TypeError, ValueError):
        raise DataError(f"{where}: {cols[0]}={a!r}, {cols[1]}={b!r} are not numbers") from None
    if not all(np.isfinite(out)):
        raise DataError(f"{where}: {cols[0]}={a!r}, {cols[1]}={b!r} are not finite")
    return out


def _add_row(
    rows: list[PairRow],
    counts: _Counts,
    dcfg: DataConfig,
    caption: Any,
    label_0: float,
    source: int,
    row: int,
    captions: tuple[Any, Any] | None = None,
    scores: tuple[float, float] | None = None,
) -> None:
    if label_0 == 0.5 and dcfg.drop_ties:
        counts.ties += 1
        return
    if not isinstance(caption, str) or not caption.strip():
        counts.empty_caption += 1
        return
    if captions is not None and not all(isinstance(c, str) and c.strip() for c in captions):
        counts.empty_caption += 1
        return
    rows.append(PairRow(caption, source, row, swap=label_0 == 0.0, captions=captions, scores=scores))


def _index_jsonl(dcfg: DataConfig, counts: _Counts) -> tuple[list[PairRow], list[tuple[Path, Path]]]:
    """JSONL rows: ``{"caption", "chosen", "rejected"}`` or ``{"caption", "image_0", "image_1", "label_0"}``;
    image paths are relative to the JSONL file."""
    p = Path(dcfg.path).expanduser()
    rows: list[PairRow] = []
    paths: list[tuple[Path, Path]] = []
    for ln, raw in enumerate(p.read_bytes().splitlines(), start=1):
        where = f"{p} line {ln}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: expected a JSON object with caption, chosen, rejected; got a {type(rec).__name__}"
            )
        cap = rec.get("caption", rec.get("prompt"))
        if "chosen" in rec and "rejected" in rec:
            a, b, lab = rec["chosen"], rec["rejected"], 1.0
        elif "image_0" in rec and "image_1" in rec and "label_0" in rec:
            a, b, lab = rec["image_0"], rec["image_1"], _check_label(rec["label_0"], where)
        else:
            raise DataError(
                f"{where}: needs keys caption + chosen + rejected (or "
                f"image_0, image_1, label_0); found {', '.join(rec)}"
            )
        paths.append(
            tuple(
                _confined(p.parent, v, f"{where} key {k!r}", dcfg.allow_outside_paths)
                for k, v in (
                    ("chosen" if "chosen" in rec else "image_0", a),
                    ("rejected" if "rejected" in rec else "image_1", b),
                )
            )
        )
        _add_row(rows, counts, dcfg, cap, lab, len(paths) - 1, len(paths) - 1)
    return rows, paths


def _confined(root: Path, value: Any, where: str, allow_outside: bool) -> Path:
    """``root / value``, refused when it leaves ``root`` (``../``, absolute paths, symlinked folders)
    unless the user allowed it: a data file should not read whatever files it names."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise DataError(f"{where}: expected an image path (a non-empty string without NUL), got {value!r}")
    path = root / value
    if not allow_outside and not path.resolve().is_relative_to(root.resolve()):
        raise DataError(
            f"{where}: {value!r} points outside the data folder {str(root)!r}; move the images under it "
            f"or set data.allow_outside_paths=true"
        )
    return path


def _index_folder(dcfg: DataConfig, counts: _Counts) -> tuple[list[PairRow], list[tuple[Path, Path]]]:
    """``chosen/NAME.png`` + ``rejected/NAME.png`` + caption in ``chosen/NAME.txt``."""
    root = Path(dcfg.path).expanduser()
    rows: list[PairRow] = []
    paths: list[tuple[Path, Path]] = []
    for img in sorted((root / "chosen").iterdir()):
        if img.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rej = [q for q in (root / "rejected").glob(img.stem + ".*") if q.suffix.lower() in IMAGE_SUFFIXES]
        if not rej:
            raise DataError(f"{img}: no matching rejected/{img.stem}.* image")
        txt = img.with_suffix(".txt")
        try:
            cap = txt.read_bytes().decode("utf-8").strip() if txt.exists() else ""
        except UnicodeDecodeError as e:
            raise DataError(f"{txt}: not UTF-8 text (byte {e.start}); save the caption as UTF-8") from None
        paths.append((img, rej[0]))
        _add_row(rows, counts, dcfg, cap, 1.0, len(paths) - 1, len(paths) - 1)
    return rows, paths


def _index_hf(dcfg: DataConfig, counts: _Counts) -> tuple[list[PairRow], Any]:
    try:
        import datasets
    except ImportError:
        raise DataError("data.format 'hf' needs the datasets package: pip install 'diffalign[hf]'") from None
    p = Path(dcfg.path).expanduser()
    try:
        ds = (
            datasets.load_from_disk(str(p))
            if p.exists()
            else datasets.load_dataset(dcfg.path, split=dcfg.split)
        )
    except Exception as e:  # offline misses, unknown ids, corrupt folders: one line, not a traceback
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"data.path {dcfg.path!r}: the datasets library could not load it ({type(e).__name__}: "
            f"{msg[:200]}); check the id or folder (offline, only cached hub datasets load)"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if dcfg.split not in ds:
            raise DataError(f"data.split {dcfg.split!r} not in {dcfg.path} (splits: {', '.join(ds)})")
        ds = ds[dcfg.split]
    missing = [c for c in PICKAPIC_REQUIRED if c not in ds.column_names]
    if missing:
        raise DataError(f"{dcfg.path}: missing column {missing[0]!r} (found {', '.join(ds.column_names)})")
    rows: list[PairRow] = []
    for r, (cap, lab) in enumerate(zip(ds["caption"], ds["label_0"], strict=True)):
        _add_row(rows, counts, dcfg, cap, _check_label(lab, f"{dcfg.path} row {r}"), 0, r)
    return rows, ds


# ----------------------------------------------------------------------------- transforms


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    return img if img.size == size else img.resize(size, Image.BILINEAR)


def joint_transform(
    images: list[Image.Image], resolution: int, center_crop: bool, flip: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize/crop/flip a group of images identically (winner first). Returns pixels ``[k,3,R,R]``
    in [-1,1] and the SDXL micro-conditioning row ``[6]`` (winner's original h, w, crop top, left,
    target h, w)."""
    imgs = [im.convert("RGB") for im in images]
    W, H = imgs[0].size
    imgs = [imgs[0]] + [_resize(im, (W, H)) for im in imgs[1:]]  # all take the winner's size: one micro row
    s = resolution / min(W, H)
    nw, nh = max(resolution, round(W * s)), max(resolution, round(H * s))
    imgs = [_resize(im, (nw, nh)) for im in imgs]
    if center_crop:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top = int(torch.randint(0, nh - resolution + 1, (), generator=gen))
        left = int(torch.randint(0, nw - resolution + 1, (), generator=gen))
    box = (left, top, left + resolution, top + resolution)
    arr = np.stack([np.asarray(im.crop(box)) for im in imgs])  # [k,R,R,3] uint8
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # [k,3,R,R]
    if flip and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    micro = torch.tensor([H, W, top, left, resolution, resolution], dtype=torch.float32)
    return x, micro


def sample_seed(seed: int, position: int, domain: int = 0) -> int:
    """A well-mixed 63-bit seed for stream position ``position`` of a run seeded ``seed``
    (``domain`` separates independent uses, e.g. 1 for epoch permutations)."""
    state = np.random.SeedSequence([seed, domain, position]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> np.uint64(1))


# ----------------------------------------------------------------------------- dataset


class PairDataset(torch.utils.data.Dataset):
    """Map-style dataset; ``ds[(index, seed)]`` returns one pair, winner first.

    Item: ``pixels [2,3,R,R]`` in [-1,1] (``[2,F,3,R,R]`` for video clips, ``[2,S]`` for audio),
    ``caption`` (empty string when caption dropout hits), ``micro [6]``, ``seed`` (for the loop's
    noise/timestep draws), ``index``, ``skipped``."""

    k = 2  # images per item

    def __init__(self, dcfg: DataConfig, verbose: bool = True) -> None:
        self.cfg = dcfg
        self.format = detect_format(dcfg)
        counts = _Counts()
        if dcfg.score_column and self.format != "parquet":
            raise DataError(f"data.score_column is read from parquet data; {dcfg.path!r} is {self.format}")
        if self.format == "parquet":
            self.rows, self._images = _index_parquet(dcfg, counts)
        elif self.format == "jsonl":
            self.rows, self._images = _index_jsonl(dcfg, counts)
        elif self.format == "folder":
            self.rows, self._images = _index_folder(dcfg, counts)
        else:
            self.rows, self._images = _index_hf(dcfg, counts)
        if dcfg.max_pairs is not None:
            self.rows = self.rows[: dcfg.max_pairs]
        if not self.rows:
            raise DataError(f"data.path {dcfg.path!r}: no usable pairs ({counts.summary(0, 'data')})")
        self.summary = counts.summary(len(self.rows), str(dcfg.path))
        if verbose:
            print(self.summary)

    def __len__(self) -> int:
        return len(self.rows)

    def _raw(self, row: PairRow) -> tuple[Any, Any]:
        if self.format == "parquet":
            return self._images.get(row.source, row.row)
        if self.format == "hf":
            rec = self._images[row.row]
            return rec["jpg_0"], rec["jpg_1"]
        return self._images[row.source]

    @staticmethod
    def _open(x: Any) -> Any:
        """An image, video clip or audio clip (see ``media.py``); decoded now so corrupt bytes fail
        here, not later."""
        if isinstance(x, Image.Image):
            return x
        return decode_media(bytes(x) if isinstance(x, bytes | bytearray) else str(x))

    def load_pair(self, index: int) -> tuple[Image.Image, Image.Image, int]:
        """Decode pair ``index`` (winner, loser); a corrupt pair is replaced by the next readable
        one. Returns the images and how many pairs were skipped."""
        for skipped in range(len(self.rows)):
            row = self.rows[(index + skipped) % len(self.rows)]
            try:
                a, b = (self._open(v) for v in self._raw(row))
            except DECODE_ERRORS as e:
                print(
                    f"warning: skipping pair {row.source}:{row.row} "
                    f"({row.caption[:40]!r}): undecodable image ({type(e).__name__})"
                )
                continue
            return (b, a, skipped) if row.swap else (a, b, skipped)
        raise DataError(f"data.path {self.cfg.path!r}: no readable image pair at all")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        gen = torch.Generator().manual_seed(seed)
        win, lose, skipped = self.load_pair(index)
        pixels, micro = media_tensors(
            [win, lose], self.cfg.resolution, self.cfg.center_crop, self.cfg.random_flip, gen
        )
        row = self.rows[(index + skipped) % len(self.rows)]
        caption = row.caption
        dropped = self.cfg.caption_dropout > 0 and bool(
            torch.rand((), generator=gen) < self.cfg.caption_dropout
        )
        if dropped:
            caption = ""  # one decision per pair: winner and loser stay consistent
        item = {
            "pixels": pixels,
            "caption": caption,
            "micro": micro,
            "seed": seed,
            "index": index,
            "skipped": skipped,
        }
        if row.captions is not None:  # per-image captions, winner first (swapped with the images)
            caps = list(reversed(row.captions)) if row.swap else list(row.captions)
            item["captions"] = ["", ""] if dropped else caps
        if row.scores is not None:  # winner first, like the images
            item["scores"] = torch.tensor(row.scores[::-1] if row.swap else row.scores, dtype=torch.float32)
        return item

    @property
    def has_scores(self) -> bool:
        return self.rows[0].scores is not None


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if isinstance(vals[0], torch.Tensor):
            out[k] = torch.stack(vals)
        elif isinstance(vals[0], dict):  # cached text conditioning
            out[k] = {n: torch.stack([v[n] for v in vals]) for n in vals[0]}
        else:
            out[k] = vals
    return out
