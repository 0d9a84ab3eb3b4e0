"""Ranked datasets (Syn-Pic schema): one row per prompt with k images and their ranking.

Columns: ``prompt`` (str), ``images`` (list of encoded PNG/JPEG bytes, length k), ``phi`` (list of
floats in [0,1], the fraction of pairwise reward wins) and ``rank`` (list of ints, 1 = best);
optional ``generator``, ``seed``, ``scores.<reward>`` lists. Items are returned best first, so
``pixels[0]`` is the top-ranked image, as pair datasets put the winner first.

A Syn-Pic folder (``manifest.json``, ``index.json``, ``shard-*.parquet``) is used only when it is
complete: ``index.json`` valid and every shard matching its checksum (``diffalign.synpic.ranked_shards``);
otherwise a one-line error says to rerun synpic, or, with ``data.allow_incomplete=true``, only the
verified shards are read and the summary says how many were left out. Other parquet files and
folders are read as they are.

Policies, counted and reported like the pair datasets': empty prompts are skipped; a rank that is
not a permutation is an error naming the file and row; a group with an undecodable image is
replaced at read time by the next readable group (the batch size is kept) and counted in
``skipped`` (``data/skipped`` in the metrics).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from .media import DECODE_ERRORS, decode_media, media_tensors
from .pairs import DataError, ParquetImages, check_columns, parquet_files

RANKED_REQUIRED = ("prompt", "images", "phi", "rank")


def ranked_files(dcfg: DataConfig) -> tuple[list[Path], str | None]:
    """The parquet files to read, and a note on the shards left out of an incomplete Syn-Pic set."""
    from ..synpic import is_synpic_folder, ranked_shards

    if is_synpic_folder(dcfg.path):
        try:
            return ranked_shards(dcfg.path, dcfg.allow_incomplete, "set data.allow_incomplete=true")
        except ConfigError as e:
            raise DataError(str(e)) from None
    return parquet_files(dcfg.path), None


class RankedDataset(torch.utils.data.Dataset):
    def __init__(self, dcfg: DataConfig, verbose: bool = True) -> None:
        import pyarrow.parquet as pq

        self.cfg = dcfg
        files, note = ranked_files(dcfg)
        self.files = files
        self.rows: list[tuple[int, int, str, list[float], list[int]]] = []
        ks = set()
        skipped = 0
        for si, f in enumerate(files):
            check_columns(f, RANKED_REQUIRED, "ranked")
            tbl = pq.read_table(f, columns=["prompt", "phi", "rank"])
            for r, (p, phi, rank) in enumerate(
                zip(*(tbl.column(c).to_pylist() for c in ("prompt", "phi", "rank")), strict=True)
            ):
                if not isinstance(p, str) or not p.strip():
                    skipped += 1
                    continue
                if len(phi) != len(rank) or sorted(rank) != list(range(1, len(rank) + 1)):
                    raise DataError(
                        f"{f} row {r}: rank {rank} must be a permutation of 1..{len(phi)} matching phi"
                    )
                ks.add(len(phi))
                self.rows.append((si, r, p, phi, rank))
        if len(ks) > 1:
            raise DataError(
                f"data.path {dcfg.path!r}: rows have different numbers of images {sorted(ks)}; "
                f"one k per dataset"
            )
        if not self.rows:
            raise DataError(f"data.path {dcfg.path!r}: no usable ranked rows")
        if dcfg.max_pairs is not None:
            self.rows = self.rows[: dcfg.max_pairs]
        self.k = ks.pop()
        self._images = ParquetImages(files, columns=("images",))
        self.summary = (
            f"{dcfg.path}: {len(self.rows)} prompts x {self.k} ranked images; skipped {skipped} empty prompts"
        )
        if note:
            self.summary += f"; {note}"
        if verbose:
            print(self.summary)

    def __len__(self) -> int:
        return len(self.rows)

    def _decode(self, si: int, r: int, order: np.ndarray) -> list[Any]:
        (blobs,) = self._images.get(si, r)
        if not isinstance(blobs, list) or len(blobs) != len(order):
            raise ValueError(f"{0 if blobs is None else len(blobs)} images for {len(order)} ranks")
        out = []
        for j in order:
            if not isinstance(blobs[j], bytes | bytearray):
                raise ValueError(f"image {j} is {type(blobs[j]).__name__}, not bytes")
            out.append(decode_media(blobs[j]))
        return out

    def load_group(self, index: int) -> tuple[int, list[Any], np.ndarray]:
        """Decode group ``index`` best first; a group with an undecodable image is replaced by the next
        readable one (as ``PairDataset.load_pair`` does). Returns how many groups were skipped, the
        media and the order (best first) of the group used."""
        for skipped in range(len(self.rows)):
            si, r, prompt, _, rank = self.rows[(index + skipped) % len(self.rows)]
            order = np.argsort(rank, kind="stable")  # best first
            try:
                return skipped, self._decode(si, r, order), order
            except DECODE_ERRORS as e:
                print(
                    f"warning: skipping ranked group {self.files[si]} row {r} "
                    f"({prompt[:40]!r}): undecodable image ({type(e).__name__}: {str(e)[:80]})"
                )
        raise DataError(f"data.path {self.cfg.path!r}: no ranked group with every image readable")

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        skipped, imgs, order = self.load_group(index)
        _, _, prompt, phi, rank = self.rows[(index + skipped) % len(self.rows)]
        gen = torch.Generator().manual_seed(seed)
        pixels, micro = media_tensors(
            imgs, self.cfg.resolution, self.cfg.center_crop, self.cfg.random_flip, gen
        )
        caption = prompt
        if self.cfg.caption_dropout > 0 and bool(torch.rand((), generator=gen) < self.cfg.caption_dropout):
            caption = ""
        return {
            "pixels": pixels,
            "caption": caption,
            "micro": micro,
            "seed": seed,
            "index": index,
            "skipped": skipped,
            "phi": torch.tensor([phi[j] for j in order], dtype=torch.float32),
            "rank": torch.tensor([rank[j] for j in order], dtype=torch.long),
        }
