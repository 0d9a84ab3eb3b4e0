"""Evaluation statistics and settings (issue #25): distinct prompts, the cluster bootstrap over them,
one home per seed / statistics helper, and the split of the eval harness into modules."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from diffalign.benchmarks.geneval import stats
from diffalign.benchmarks.geneval.metadata import shapes_prompts
from diffalign.benchmarks.geneval.rules import TAGS


def _results(spec, seed: int = 0):
    """Per-image results for ``spec`` = [(tag, prompt, [base correct...], [aligned correct...]), ...];
    a prompt may appear in several rows (drawn again, other image seeds)."""
    base, new = [], []
    for row, (tag, prompt, b, a) in enumerate(spec):
        for k, (cb, ca) in enumerate(zip(b, a, strict=True)):
            s = 1000 * row + k + seed
            base.append({"tag": tag, "prompt": prompt, "seed": s, "correct": bool(cb)})
            new.append({"tag": tag, "prompt": prompt, "seed": s, "correct": bool(ca)})
    return base, new


def _restated_paired_ci(base, new, n, seed, cluster_key):
    """The paired bootstrap restated with numpy alone: clusters (by ``cluster_key``) resampled within
    each tag (GenEval's tags in order, then others sorted), tag accuracy = mean over the resampled
    clusters' images, overall = mean over tags; 2.5% and 97.5% quantiles of new - base."""
    a = np.array([r["correct"] for r in base], float)
    b = np.array([r["correct"] for r in new], float)
    tags = [t for t in TAGS if any(r["tag"] == t for r in base)]
    tags += sorted({r["tag"] for r in base} - set(TAGS))
    clusters = {}
    for t in tags:
        keys = list(dict.fromkeys(cluster_key(j, r) for j, r in enumerate(base) if r["tag"] == t))
        clusters[t] = [
            np.array([j for j, r in enumerate(base) if r["tag"] == t and cluster_key(j, r) == key])
            for key in keys
        ]
    rng = np.random.default_rng(seed)
    overall = []
    for _ in range(n):
        d = []
        for t in tags:
            cs = clusters[t]
            idx = np.concatenate([cs[i] for i in rng.integers(0, len(cs), len(cs))])
            d.append(b[idx].mean() - a[idx].mean())
        overall.append(np.mean(d))
    return [np.quantile(overall, 0.025), np.quantile(overall, 0.975)]


# "a photo of three circles" drawn 7 times, as in the demo's old held-out sample; 4 images per draw
REPEATS = [
    *[("counting", "a photo of three circles", [0, 0, 0, 0], [1, 1, 1, 0])] * 7,
    *[("counting", "a photo of four triangles", [0, 1, 0, 0], [0, 1, 0, 0])] * 3,
    ("colors", "a photo of a red triangle", [1, 0, 1, 0], [1, 1, 1, 0]),
    ("colors", "a photo of a blue square", [0, 0, 1, 0], [0, 0, 1, 1]),
    ("colors", "a photo of a red triangle", [1, 1, 0, 0], [1, 1, 1, 1]),
    ("colors", "a photo of a green circle", [0, 0, 0, 0], [0, 1, 0, 0]),
]


def test_paired_ci_is_the_cluster_bootstrap_over_distinct_prompts():
    base, new = _results(REPEATS)
    d = stats.paired_difference(base, new, n_boot=500, seed=3)
    want = _restated_paired_ci(base, new, 500, 3, cluster_key=lambda j, r: r["prompt"])
    np.testing.assert_allclose(d["overall_ci95"], want, rtol=0, atol=1e-12)
    assert d["n_prompts"] == 5 and d["n_prompts_per_tag"] == {"counting": 2, "colors": 3}
    # the toy tables' view (demo, objective bench, video/audio worlds) is the same statistic
    g = stats.overall_gain(base, new, n_boot=500, seed=3)
    assert (g["diff"], [g["ci95_low"], g["ci95_high"]], g["n_prompts"]) == (
        d["overall"],
        d["overall_ci95"],
        5,
    )
    # the per-model summary counts distinct prompts and resamples them the same way
    s = stats.summarize_results(base, n_boot=200, seed=1)
    assert s["n_prompts"] == 5 and s["n_per_tag"] == {"counting": 40, "colors": 16}
    with pytest.raises(Exception, match="same prompts and seeds"):
        stats.paired_difference(base, new[::-1])


def test_cluster_ci_is_wider_than_treating_repeats_as_independent_prompts():
    """Two counting prompts, each drawn 10 times: one the aligned model always gets right, one it never
    does. Resampling the 20 draws as if they were 20 prompts pretends to know the tag's gain to within a
    few points; over the two distinct prompts it can be anything from 0 to 1."""
    spec = [
        *[("counting", "a photo of three circles", [0, 0, 0, 0], [1, 1, 1, 1])] * 10,
        *[("counting", "a photo of two squares", [0, 0, 0, 0], [0, 0, 0, 0])] * 10,
    ]
    base, new = _results(spec)
    lo, hi = stats.paired_difference(base, new, n_boot=1000, seed=0)["overall_ci95"]
    naive_lo, naive_hi = _restated_paired_ci(base, new, 1000, 0, cluster_key=lambda j, r: j // 4)
    assert (lo, hi) == (0.0, 1.0)
    assert hi - lo > 2 * (naive_hi - naive_lo) and naive_hi - naive_lo < 0.5


def test_shapes_prompts_are_distinct_and_all_of_a_split_when_more_are_asked():
    p = shapes_prompts("heldout", 60, 1000)
    assert len({m["prompt"] for m in p}) == 60
    tags = [m["tag"] for m in p]
    assert {t: tags.count(t) for t in set(tags)} == {
        "two_object": 2,
        "counting": 2,
        "colors": 4,
        "position": 4,
        "color_attr": 48,
    }
    every = shapes_prompts("heldout", 500, 0)
    assert len(every) == len({m["prompt"] for m in every}) == 120  # the whole held-out split

    from diffalign.benchmarks.geneval.prompts import prompt_set
    from diffalign.benchmarks.geneval.settings import EvalConfig

    rows, judged, text = prompt_set(EvalConfig(model="m", out="o", toy="heldout", n_prompts=500))
    assert (
        len(rows) == 120 and judged and "120 distinct prompts (asked for 500: the split has only 120)" in text
    )


def test_one_home_per_helper():
    """Per-image seeds come from diffalign.synpic.image_seed, with the values every stored result was
    made with; the statistics live in geneval.stats only; the two prompt readers say what they read."""
    from diffalign import synpic
    from diffalign.benchmarks.geneval import generation, harness, judging, metadata
    from diffalign.benchmarks.toyworlds import evaluate

    assert synpic.image_seed(0, 1, 2) == 3884055042  # (seed, prompt, sample): evaluations
    assert synpic.image_seed(7, 3, 1, 2) == 2165843894  # (seed, prompt, generator, image): Syn-Pic
    assert synpic.image_seed(1000, 59, 3) == int(np.random.SeedSequence([1000, 59, 3]).generate_state(1)[0])
    assert evaluate.image_seed is generation.image_seed is judging.image_seed is synpic.image_seed
    for mod in (harness, evaluate):  # no own copies: a name they hold is the one in stats
        for name in ("paired_difference", "summarize_results", "tag_bootstrap"):
            assert getattr(mod, name, getattr(stats, name)) is getattr(stats, name)
        assert not hasattr(mod, "bootstrap_ci")
    assert not hasattr(metadata, "read_prompts") and callable(metadata.read_prompt_rows)


@pytest.mark.parametrize(
    "module", ["settings", "prompts", "generation", "judging", "stats", "report", "harness"]
)
def test_eval_modules_import_on_their_own(module):
    """Each module of the split harness imports first in a fresh interpreter (no import cycles), and
    the harness (imported to build the CLI parser) does not pull in torch."""
    code = f"import sys, diffalign.benchmarks.geneval.{module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    if module == "harness":
        assert out.stdout.strip() == "False"
