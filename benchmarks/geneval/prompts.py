"""``diffalign eval`` prompt sets: GenEval metadata, GenEval templates, ShapesWorld, plain prompt files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ...errors import ConfigError
from .metadata import geneval_prompts, read_metadata, read_prompt_rows, shapes_prompts
from .settings import EvalConfig


def take_balanced(rows: Sequence[Mapping[str, Any]], n: int | None, key: str) -> list[dict[str, Any]]:
    """N rows, round-robin over ``row[key]`` groups (in order of first appearance), file order kept."""
    if n is None or n >= len(rows):
        return [dict(r) for r in rows]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(str(r.get(key)), []).append(i)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for idx in groups.values():
            if depth < len(idx) and len(chosen) < n:
                chosen.append(idx[depth])
        depth += 1
    return [dict(rows[i]) for i in sorted(chosen)]


def count_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """'N prompts', or 'N prompts, K distinct' when some repeat (statistics resample the K)."""
    k = len({r["prompt"] for r in rows})
    return f"{len(rows)} prompts" + (f", {k} distinct" if k != len(rows) else "")


def prompt_set(cfg: EvalConfig) -> tuple[list[dict[str, Any]], bool, str]:
    """(rows, judged, description) for the configured prompt source."""
    given = [x for x in ("metadata", "toy", "templates", "prompts") if getattr(cfg, x) not in (None, [])]
    if len(given) != 1:
        raise ConfigError(
            "eval needs exactly one prompt source: --metadata, --toy, --geneval-templates or --prompts"
            + (f" (got {', '.join('--' + g for g in given)})" if given else "")
        )
    if cfg.n_prompts is not None and cfg.n_prompts < 1:
        raise ConfigError(f"--n-prompts must be >= 1, got {cfg.n_prompts}")
    if cfg.toy is not None:
        seed = 0 if cfg.prompt_seed is None else cfg.prompt_seed
        n = 60 if cfg.n_prompts is None else cfg.n_prompts
        rows = shapes_prompts(cfg.toy, n, seed)
        short = f" (asked for {n}: the split has only {len(rows)})" if len(rows) < n else ""
        return rows, True, f"ShapesWorld {cfg.toy}, {len(rows)} distinct prompts{short}, seed {seed}"
    if cfg.metadata is not None:
        rows = take_balanced(read_metadata(cfg.metadata), cfg.n_prompts, "tag")
        return rows, True, f"{cfg.metadata} ({count_text(rows)})"
    if cfg.templates is not None:
        seed = 43 if cfg.prompt_seed is None else cfg.prompt_seed
        rows = take_balanced(geneval_prompts(cfg.templates, seed), cfg.n_prompts, "tag")
        return rows, True, f"GenEval templates, {cfg.templates} per tag, seed {seed} ({count_text(rows)})"
    rows = [r for f in cfg.prompts for r in read_prompt_rows(f)]
    rows = take_balanced(rows, cfg.n_prompts, "category")
    return rows, False, f"{', '.join(cfg.prompts)} ({count_text(rows)})"
