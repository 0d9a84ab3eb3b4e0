"""The demo pipeline end to end on tiny models (plumbing; the real run uses the shipped toy models)."""

from __future__ import annotations

import json
from html import escape

import pytest

from diffalign.demo import run_demo
from diffalign.errors import ConfigError


def test_demo_plumbing_and_report(tmp_path, tiny_models, tiny_clip):
    m = run_demo(
        out=str(tmp_path / "demo"),
        model=str(tiny_models["sd"]),
        generators=[str(tiny_models["sd"])],
        rewards=[f"pickscore={tiny_clip}", f"clip_score={tiny_clip}"],
        steps=2,
        n_train=4,
        n_eval=8,  # drawn with replacement, 8 held-out prompts used to hold only 5 distinct ones
        per_prompt=2,
        sample_steps=2,
        batch_size=2,
    )
    rep = tmp_path / "demo" / "report"
    for name in (
        "index.html",
        "report.md",
        "metrics.json",
        "base.png",
        "aligned.png",
        "training.png",
        "per_tag.png",
    ):
        assert (rep / name).exists(), name
    assert {"base", "aligned", "gain", "timing"} <= set(json.loads((rep / "metrics.json").read_text()))
    assert 0.0 <= m["base"]["overall"] <= 1.0 and len(m["base"]["per_tag"]) == 5  # held-out split: five tags
    html = (rep / "index.html").read_text()
    rows = [json.loads(x) for x in (tmp_path / "demo" / "results.jsonl").read_text().splitlines()]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    # distinct held-out prompts, each with all its images; the report and metrics say how many
    assert len(rows) == 16 and len(prompts) == 8
    assert m["base"]["n_prompts"] == m["gain"]["n_prompts"] == 8
    assert "| **overall** (95% CI) |" in (rep / "report.md").read_text()
    # rendered like the eval report: a real table, each sample captioned with its prompt, a prompt list
    assert "<table>" in html and "<pre>" not in html and "<th>prompts</th>" in html and "gain:" in html
    for c, p in enumerate(prompts, start=1):
        assert f"<figcaption>{escape(f'{c}. {p} (base ')}" in html
        assert f"<li>{escape(p)} (" in html
    assert html.count("<figure>") == 8 and html.count("<li>") == 8
    assert html.count("data:image/png;base64,") == 8 + 2  # the 8 before/after pairs, bars, curves
    # training read latents the VAE encoded once (the cache), not once per step
    assert json.loads((tmp_path / "demo" / "cache" / "index.json").read_text())["format"] == "ranked"
    # same seed, same numbers
    again = run_demo(
        out=str(tmp_path / "again"),
        model=str(tiny_models["sd"]),
        generators=[str(tiny_models["sd"])],
        rewards=[f"pickscore={tiny_clip}", f"clip_score={tiny_clip}"],
        steps=2,
        n_train=4,
        n_eval=8,
        per_prompt=2,
        sample_steps=2,
        batch_size=2,
    )
    assert {k: again[k] for k in ("base", "aligned", "gain")} == {
        k: m[k] for k in ("base", "aligned", "gain")
    }
    assert (tmp_path / "again" / "results.jsonl").read_text() == (
        tmp_path / "demo" / "results.jsonl"
    ).read_text()
    # a rerun into the same folder is refused (it would reuse the old Syn-Pic images), unless asked
    # to overwrite
    kw = dict(
        model=str(tiny_models["sd"]),
        generators=[str(tiny_models["sd"])],
        rewards=[f"pickscore={tiny_clip}"],
        steps=1,
        n_train=4,
        n_eval=5,
        per_prompt=2,
        sample_steps=2,
        batch_size=2,
    )
    with pytest.raises(ConfigError, match="holds a previous demo .*--overwrite"):
        run_demo(out=str(tmp_path / "demo"), **kw)
    stamp = (tmp_path / "demo" / "results.jsonl").stat().st_mtime_ns
    run_demo(out=str(tmp_path / "demo"), overwrite=True, **kw)
    assert (tmp_path / "demo" / "results.jsonl").stat().st_mtime_ns != stamp


def test_demo_refuses_objectives_it_does_not_wire_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"'rankdpo'.*objective_bench"):
        run_demo(out=str(tmp_path / "x"), objective="rankdp")
    with pytest.raises(ConfigError, match="mapo"):
        run_demo(out=str(tmp_path / "x"), objective="mapo")
    with pytest.raises(
        ConfigError, match="max_steps"
    ):  # bad hyperparameters: refused before any file is written
        run_demo(out=str(tmp_path / "x"), steps=0)
    with pytest.raises(ConfigError, match=r"one per generator \(3\)"):  # toy-sd, toy-sd3, the policy unguided
        run_demo(out=str(tmp_path / "x"), images_per_generator=[3, 1, 1, 1])
    with pytest.raises(
        ConfigError, match=r"synpic_guidance \[4.0, 1.0\]: give one scale, or one per generator \(3\)"
    ):
        run_demo(out=str(tmp_path / "x"), synpic_guidance=[4.0, 1.0])
    assert not (tmp_path / "x").exists()


def test_demo_online_dpo_skips_synpic_and_reports(tmp_path, tiny_models, tiny_clip):
    m = run_demo(
        out=str(tmp_path / "on"),
        model=str(tiny_models["sd"]),
        rewards=[f"pickscore={tiny_clip}"],
        objective="online_dpo",
        steps=1,
        n_train=4,
        n_eval=5,
        per_prompt=2,
        sample_steps=2,
        batch_size=2,
    )
    assert not (tmp_path / "on" / "synpic").exists() and (tmp_path / "on" / "report" / "index.html").exists()
    assert m["settings"]["objective"] == "online_dpo" and m["settings"]["generators"] == []
    assert len(m["aligned"]["per_tag"]) == 5
    assert (tmp_path / "on" / "run" / "checkpoints" / "latest").exists()


def test_demo_flow_grpo_runs_the_online_rl_path_with_the_judge_as_reward(tmp_path, tiny_models):
    """`diffalign demo --objective flow_grpo`: no Syn-Pic, prompts with GenEval metadata, the exact
    ShapesWorld judge as the reward, a report."""
    m = run_demo(
        out=str(tmp_path / "rl"),
        model=str(tiny_models["sd3"]),
        objective="flow_grpo",
        steps=1,
        n_train=4,
        n_eval=5,
        per_prompt=2,
        sample_steps=2,
        batch_size=2,
    )
    root = tmp_path / "rl"
    assert not (root / "synpic").exists() and (root / "report" / "index.html").exists()
    assert m["settings"]["rewards"] == [f"shapes_partial={root / 'prompts.jsonl'}"]
    rows = [json.loads(x) for x in (root / "prompts.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("include" in r for r in rows)
    logged = json.loads((root / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= logged["reward"] <= 1.0 and logged["ratio"] == 1.0
