"""The online-RL benchmark (``benchmarks/toyworlds/online_bench.py``) end to end at a tiny budget: a
recipe trains, base and aligned are judged, the row's gains agree with the per-image verdicts it
writes, and ``--trained-in`` re-judges the trained weights without training again."""

from __future__ import annotations

import json

import pytest

from diffalign.benchmarks.toyworlds import online_bench

TINY = ["--minutes", "0.02", "--n-train", "2", "--n-eval", "2", "--sample-steps", "2"]


def tag_mean_gain(lines: list[dict]) -> float:
    """GenEval's overall score is the mean of the tag accuracies; the gain is that of aligned minus
    that of base, computed here from the saved verdicts alone."""
    tags: dict[str, list[tuple[bool, bool]]] = {}
    for r in lines:
        tags.setdefault(r["tag"], []).append((r["base"], r["aligned"]))
    per_tag = [sum(a - b for b, a in v) / len(v) for v in tags.values()]
    return sum(per_tag) / len(per_tag)


def test_recipe_row_matches_its_verdicts_and_trained_in_rejudges(tmp_path):
    out = tmp_path / "bench"
    (row,) = online_bench.main(["--out", str(out), "--recipes", "grpo-f", "--per-prompt", "1", *TINY])
    assert row["steps"] >= 1 and (out / "runs" / "grpo-f" / "summary.json").is_file()
    for which, n_prompts in (("held_in", 2), ("held_out", 2)):
        lines = [json.loads(x) for x in (out / f"grpo-f-{which}-judged.jsonl").read_text().splitlines()]
        assert len(lines) == n_prompts and len({x["prompt"] for x in lines}) == n_prompts
        assert row[which]["gain"] == pytest.approx(tag_mean_gain(lines))
        assert row[which]["gain"] == pytest.approx(row[which]["aligned"] - row[which]["base"])
        per_tag = row[which]["per_tag"]  # tag -> [gain, ci low, ci high]
        assert set(per_tag) == {x["tag"] for x in lines}
        assert all(lo <= g <= hi for g, lo, hi in per_tag.values())
        assert sum(row[which]["prompts_per_tag"].values()) == n_prompts

    again = tmp_path / "again"  # the same weights, judged with 2 images per prompt, no training
    (row2,) = online_bench.main(
        ["--out", str(again), "--trained-in", str(out), "--recipes", "grpo-f", "--per-prompt", "2", *TINY]
    )
    assert not (again / "runs").exists() and row2["trained_in"] == str(out)
    assert row2["steps"] == row["steps"] and row2["per_prompt"] == 2
    lines = [json.loads(x) for x in (again / "grpo-f-held_out-judged.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and row2["held_out"]["gain"] == pytest.approx(tag_mean_gain(lines))


def test_trained_in_refuses_other_prompts(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "prompts.jsonl").write_text('{"prompt": "something else"}\n')
    with pytest.raises(SystemExit, match="other prompts.jsonl"):
        online_bench.main(["--out", str(tmp_path / "new"), "--trained-in", str(tmp_path / "old"), *TINY])


def test_unknown_recipe_names_the_choices():
    with pytest.raises(SystemExit, match="unknown recipe 'grpo-zz'; choose from grpo-a"):
        online_bench.recipe("grpo-zz")
