"""`diffalign eval` sampling settings (issue #25): printed in one line at the start, recorded in
summary.json and the report header, and inherited by a compared run from the base run's earlier eval
in the same folder; a value given on the command line that differs is refused in one line. The batch
grid (--per-prompt, --batch) is among them: a rerun on another grid would mix images made in other
batches."""

from __future__ import annotations

import json

import pytest

from diffalign.benchmarks.geneval import harness
from diffalign.benchmarks.geneval.settings import EvalConfig, resolve_sampling
from diffalign.demo import asset
from diffalign.errors import ConfigError


def _cfg(out, **kw) -> EvalConfig:
    base = dict(model=asset("toy-sd"), out=str(out), toy="train", n_prompts=2, per_prompt=1, device="cpu")
    return EvalConfig(**{**base, "n_boot": 50, **kw})


def test_defaults_are_said_and_recorded(tmp_path, capsys):
    """--metadata samples at GenEval's 50 steps / guidance 9, --toy at 20 / 4: the first lines say so."""
    geneval = resolve_sampling(EvalConfig(model="m", out="o", metadata="x.jsonl"), {"models": {}})
    assert (geneval["steps"], geneval["guidance"], geneval["source"]["steps"]) == (50, 9.0, "default")
    from diffalign.cli import main

    md = tmp_path / "shapes.jsonl"
    md.write_text(
        json.dumps(
            {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
        )
        + "\n"
    )
    args = ["eval", "--model", asset("toy-sd"), "--metadata", str(md), "--detector", "shapes"]
    assert main([*args, "--per-prompt", "1", "--no-report", "--out", str(tmp_path / "g")]) == 0
    lines = capsys.readouterr().out.splitlines()
    said = [ln for ln in lines if ln.startswith("sampling:")]
    assert said == [
        "sampling: 50 steps (default), guidance 9 (default), size the pipeline's (default), seed 0, "
        "1 image per prompt (given) in batches of 16 (default)"
    ]
    assert lines.index(said[0]) == 1  # right after the line naming the prompt set
    summary = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert summary["sampling"]["steps"] == 50 and summary["sampling"]["guidance"] == 9.0


def test_compare_inherits_the_base_runs_settings(tmp_path):
    root = tmp_path / "run"
    said: list[str] = []
    first = harness.run_eval(_cfg(root, steps=3, guidance=2.0), log=said.append)
    assert first["sampling"]["source"] == {
        "steps": "given",
        "guidance": "given",
        "size": "default",
        "per_prompt": "given",
        "batch": "default",
    }
    assert (
        "sampling: 3 steps (given), guidance 2 (given), size the pipeline's (default), seed 0, "
        "1 image per prompt (given) in batches of 16 (default)" in said
    )
    # the aligned model added later, no sampling flags: the base run's settings, not --toy's 20 / 4
    out = harness.run_eval(_cfg(root, compare=asset("toy-sd3")), log=lambda *a: None)
    assert out["generated"] == {"model": 0, "compare": 2}
    assert (out["sampling"]["steps"], out["sampling"]["guidance"]) == (3, 2.0)
    assert out["sampling"]["source"] == {
        **dict.fromkeys(("steps", "guidance", "size", "batch"), "inherited"),
        "per_prompt": "given",
    }
    manifest = json.loads((root / "eval.json").read_text())["models"]
    assert (manifest["compare"]["steps"], manifest["compare"]["guidance"]) == (3, 2.0)
    assert json.loads((root / "summary.json").read_text())["sampling"] == json.loads(
        json.dumps(out["sampling"])
    )
    assert (
        "Sampling: 3 steps (inherited), guidance 2 (inherited)" in (root / "report" / "report.md").read_text()
    )
    assert "difference" in out and out["difference"]["n_prompts"] == 2
    # given explicitly and different from the images here: refused in one line that says how to inherit
    with pytest.raises(ConfigError) as e:
        harness.run_eval(_cfg(root, compare=asset("toy-sd3"), steps=5), log=lambda *a: None)
    msg = str(e.value)
    assert "steps 3 -> 5" in msg and "leave out --steps/--guidance/--size" in msg and "\n" not in msg


def test_batch_grid_is_recorded_inherited_and_refused_when_changed(tmp_path):
    """Images are made on a fixed grid of batches (--per-prompt x prompts, cut every --batch); a rerun
    with another --batch or --per-prompt would mix two grids in one folder: refused in one line. Left
    out, both are inherited from the folder."""
    root = tmp_path / "run"
    first = harness.run_eval(_cfg(root, steps=2, per_prompt=2, batch=3), log=lambda *a: None)
    assert first["generated"] == {"model": 4}
    entry = json.loads((root / "eval.json").read_text())["models"]["model"]
    assert (entry["per_prompt"], entry["batch"]) == (2, 3)
    for change, diff in (({"batch": 4}, "batch 3 -> 4"), ({"per_prompt": 1}, "per_prompt 2 -> 1")):
        with pytest.raises(ConfigError) as e:
            harness.run_eval(_cfg(root, **{"steps": 2, "per_prompt": 2, "batch": 3, **change}), log=print)
        msg = str(e.value)
        assert diff in msg and "use another --out" in msg and "\n" not in msg
        assert "--per-prompt/--batch to inherit the earlier ones" in msg
    # the CLI refuses the same way, in one error line
    from diffalign.cli import main

    args = ["eval", "--model", asset("toy-sd"), "--toy", "train", "--n-prompts", "2", "--steps", "2"]
    assert main([*args, "--device", "cpu", "--no-report", "--batch", "5", "--out", str(root)]) == 2
    # left out: inherited (per prompt 2 and batch 3, not the defaults 4 and 16); nothing to make
    said: list[str] = []
    again = harness.run_eval(_cfg(root, steps=2, per_prompt=None), log=said.append)
    assert again["generated"] == {"model": 0}
    assert (again["sampling"]["per_prompt"], again["sampling"]["batch"]) == (2, 3)
    assert again["sampling"]["source"]["per_prompt"] == again["sampling"]["source"]["batch"] == "inherited"
    assert again["settings"]["per_prompt"] == 2 and again["settings"]["batch"] == 3
    assert any("2 images per prompt (inherited) in batches of 3 (inherited)" in ln for ln in said)


def test_a_folder_recorded_before_the_batch_grid_is_not_refused_on_it(tmp_path):
    """An eval.json entry written before per_prompt / batch were recorded cannot be checked on them: the
    rerun goes on (as before) and records them; the other settings are still compared."""
    root = tmp_path / "run"
    harness.run_eval(_cfg(root, steps=2), log=lambda *a: None)
    manifest = json.loads((root / "eval.json").read_text())
    for k in ("per_prompt", "batch"):
        del manifest["models"]["model"][k]
    (root / "eval.json").write_text(json.dumps(manifest))
    out = harness.run_eval(_cfg(root, steps=2, batch=7), log=lambda *a: None)
    assert out["generated"] == {"model": 0}
    assert json.loads((root / "eval.json").read_text())["models"]["model"]["batch"] == 7
    with pytest.raises(ConfigError, match="steps 2 -> 3"):
        harness.run_eval(_cfg(root, steps=3, batch=7), log=lambda *a: None)
