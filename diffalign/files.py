"""File helpers every layer shares: atomic writes and streamed checksums (one home for both)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes | str, tmp: Path | None = None) -> None:
    """Write to ``tmp`` (default ``<path>.tmp``), then rename onto ``path``: a kill leaves the old file
    or the new one, never half of one; a failed write removes its temporary file."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any, tmp: Path | None = None, **dumps: Any) -> None:
    """``obj`` as indented JSON, written atomically (see ``write_atomic``)."""
    write_atomic(path, json.dumps(obj, indent=2, **dumps), tmp)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, streamed (parquet shards and checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
