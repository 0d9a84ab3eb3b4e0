"""Ranked datasets (Syn-Pic schema): one row per prompt with k images and their ranking.

Columns: ``prompt`` (str), ``images`` (list of encoded PNG/JPEG bytes, length k), ``phi`` (list of
floats in [0,1], the fraction of pairwise reward wins) and ``rank`` (list of ints, 1 = best);
optional ``generator``, ``seed``, ``scores.<reward>`` lists. Items are returned best first, so
``pixels[0]`` is the top-ranked image, as pair datasets put the winner first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..config import DataConfig
from .media import decode_media, media_tensors
from .pairs import DataError, ParquetImages, check_columns, parquet_files

RANKED_REQUIRED = ("prompt", "images", "phi", "rank")


class RankedDataset(torch.utils.data.Dataset):
    def __init__(self, dcfg: DataConfig, verbose: bool = True) -> None:
        import pyarrow.parquet as pq

        self.cfg = dcfg
        files = parquet_files(dcfg.path)
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
        if verbose:
            print(self.summary)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        si, r, prompt, phi, rank = self.rows[index]
        (blobs,) = self._images.get(si, r)
        order = np.argsort(rank, kind="stable")  # best first
        imgs = []
        for j in order:
            try:
                im = decode_media(blobs[j])
            except Exception as e:  # a ranked group with a broken image cannot be trained on
                raise DataError(
                    f"{self.cfg.path} row {r}: image {j} is undecodable ({type(e).__name__})"
                ) from None
            imgs.append(im)
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
            "skipped": 0,
            "phi": torch.tensor([phi[j] for j in order], dtype=torch.float32),
            "rank": torch.tensor([rank[j] for j in order], dtype=torch.long),
        }
