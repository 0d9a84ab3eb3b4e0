"""Statistics of judged evaluations: per-tag accuracy, GenEval's overall score, cluster-bootstrap CIs.

The one home of these statistics for every judged table: ``diffalign eval``, the demo, the objective
benchmark and the toy video/audio worlds.

The unit of resampling is a *distinct prompt with all of its images* (a cluster bootstrap). Images of
one prompt are not independent draws (a prompt is about as easy or hard for every seed), and a prompt
that appears several times in a prompt list (drawn with replacement, or repeated in a file) is still
one prompt: resampling its copies as if they were separate prompts makes every CI too narrow.
Prompts are resampled within each tag (GenEval's overall score is the mean of the tag accuracies, so
each tag keeps its weight); within a tag, accuracy is the mean over its images, as in
:func:`~.rules.summarize`. A paired comparison resamples the same prompts for both models. The CIs
cover prompt and image-seed variation for one trained model, not retraining.

A tag with very few distinct prompts (ShapesWorld's held-out split has two two-object and two
counting prompts) gets a wide, coarse interval: that is what its data can say.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import ConfigError
from .rules import TAGS, summarize


def ordered_tags(tags: Iterable[str]) -> list[str]:
    """GenEval's six tags first (in GenEval's order), then any others sorted."""
    tags = set(tags)
    return [t for t in TAGS if t in tags] + sorted(t for t in tags if t not in TAGS)


def prompt_clusters(results: Sequence[Mapping[str, Any]]) -> dict[str, list[np.ndarray]]:
    """tag -> one array per distinct prompt (order of first appearance) of the positions of its images
    in ``results``; tags in :func:`ordered_tags` order."""
    by_prompt: dict[tuple[str, str], list[int]] = {}
    for j, r in enumerate(results):
        by_prompt.setdefault((str(r["tag"]), str(r["prompt"])), []).append(j)
    groups: dict[str, list[np.ndarray]] = {}
    for (tag, _), idx in by_prompt.items():
        groups.setdefault(tag, []).append(np.asarray(idx))
    return {t: groups[t] for t in ordered_tags(groups)}


def distinct_prompts(results: Sequence[Mapping[str, Any]]) -> int:
    """How many distinct prompts the results judge (the number of clusters)."""
    return len({str(r["prompt"]) for r in results})


def _correct(results: Sequence[Mapping[str, Any]]) -> np.ndarray:
    return np.array([bool(r["correct"]) for r in results], dtype=float)


def _ci(values: Sequence[float]) -> list[float]:
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def tag_bootstrap(
    results: Sequence[Mapping[str, Any]],
    n: int = 2000,
    seed: int = 0,
    other: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """95% CIs of per-tag and overall accuracy by a cluster bootstrap: distinct prompts are resampled
    within each tag, each with all of its images. With ``other`` (the same prompts and seeds in the
    same order, e.g. the aligned model), CIs of ``other - results`` on the same resampled prompts."""
    groups = prompt_clusters(results)
    a = _correct(results)
    b = _correct(other) if other is not None else None
    rng = np.random.default_rng(seed)
    boots: dict[str, list[float]] = {t: [] for t in groups}
    overall = []
    for _ in range(n):
        accs = []
        for t, clusters in groups.items():
            pick = np.concatenate([clusters[j] for j in rng.integers(0, len(clusters), len(clusters))])
            acc = a[pick].mean() if b is None else b[pick].mean() - a[pick].mean()
            boots[t].append(acc)
            accs.append(acc)
        overall.append(np.mean(accs))
    return {"per_tag_ci95": {t: _ci(v) for t, v in boots.items()}, "overall_ci95": _ci(overall)}


def prompt_counts(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``n_prompts`` (distinct prompts) and ``n_prompts_per_tag``."""
    groups = prompt_clusters(results)
    return {
        "n_prompts": distinct_prompts(results),
        "n_prompts_per_tag": {t: len(g) for t, g in groups.items()},
    }


def summarize_results(
    results: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """GenEval's summary (:func:`~.rules.summarize`, tags in order) with cluster-bootstrap CIs and the
    number of distinct prompts (``n_prompts``, ``n_prompts_per_tag``); ``n_per_tag`` counts images."""
    s = summarize(results)
    s["per_tag"] = {t: s["per_tag"][t] for t in ordered_tags(s["per_tag"])}
    s["n_per_tag"] = {t: s["n_per_tag"][t] for t in s["per_tag"]}
    s.update(prompt_counts(results))
    s.update(tag_bootstrap(results, n_boot, seed))
    return s


def overall_ci(results: Sequence[Mapping[str, Any]], n: int = 2000, seed: int = 0) -> list[float]:
    """95% cluster-bootstrap CI of the overall score (see :func:`tag_bootstrap`)."""
    return tag_bootstrap(results, n, seed)["overall_ci95"]


def paired_difference(
    base: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Per-tag and overall accuracy of ``new`` minus ``base`` (same prompts and seeds, same order) with
    paired cluster-bootstrap CIs, and the number of distinct prompts they rest on."""
    if [(r["prompt"], r["seed"]) for r in base] != [(r["prompt"], r["seed"]) for r in new]:
        raise ConfigError("paired comparison needs the same prompts and seeds for both models")
    sa, sb = summarize(base), summarize(new)
    boot = tag_bootstrap(base, n_boot, seed, other=new)
    tags = ordered_tags(sa["per_tag"])
    return {
        "overall": sb["overall"] - sa["overall"],
        "overall_ci95": boot["overall_ci95"],
        "per_tag": {t: sb["per_tag"][t] - sa["per_tag"][t] for t in tags},
        "per_tag_ci95": boot["per_tag_ci95"],
        **prompt_counts(base),
    }


def overall_gain(
    base: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """The overall row of :func:`paired_difference` in the toy tables' format: ``diff``,
    ``ci95_low``, ``ci95_high`` and ``n_prompts`` (distinct prompts)."""
    d = paired_difference(base, new, n_boot, seed)
    lo, hi = d["overall_ci95"]
    return {"diff": d["overall"], "ci95_low": lo, "ci95_high": hi, "n_prompts": d["n_prompts"]}
