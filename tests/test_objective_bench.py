"""The objective benchmark's command line (the benchmark itself runs for ~30 min;
see benchmarks/RESULTS.md)."""

from __future__ import annotations

import pytest

from diffalign.benchmarks.toyworlds import objective_bench


@pytest.mark.parametrize("spec", ["smpo", "smpo:beta", "nope:objective.beta=1", ":objective.beta=1"])
def test_set_rejects_malformed_specs(spec, capsys):
    with pytest.raises(SystemExit):
        objective_bench.main(["--set", spec, "--out", "/nonexistent/never-written"])
    err = capsys.readouterr().err
    assert "OBJECTIVE:KEY=VALUE" in err and "smpo" in err


def test_recipes_name_registered_objectives_and_valid_keys():
    from diffalign.config import load_config, validate
    from diffalign.demo import asset
    from diffalign.errors import ConfigError

    model = [f"model.path={asset('toy-sd')}"]
    with pytest.raises(ConfigError, match="betta"):  # the check below can fail
        validate(load_config(None, [*model, "objective.name=smpo", "objective.betta=1"]), check_data=False)
    for name, overrides in objective_bench.RECIPES.items():
        assert name in objective_bench.OBJECTIVES
        validate(load_config(None, [*model, f"objective.name={name}", *overrides]), check_data=False)


def _result(path, objective, seeds, base, aligned, tags):
    import json

    per = [
        {"prompt": f"p{s}", "tag": t, "seed": s, "base": b, "aligned": a}
        for s, b, a, t in zip(seeds, base, aligned, tags, strict=True)
    ]
    path.write_text(json.dumps({"objective": objective, "model": "toy-sd", "per_image": per}))
    return path


def test_pool_concatenates_independent_samples(tmp_path):
    # sample 1: tag x 0/2 -> 1/2, tag y 1/2 -> 1/2; sample 2: tag x 0/2 -> 2/2
    a = _result(tmp_path / "a.json", "kto", [1, 2, 3, 4], [0, 0, 1, 0], [1, 0, 1, 0], ["x", "x", "y", "y"])
    b = _result(tmp_path / "b.json", "kto", [5, 6], [0, 0], [1, 1], ["x", "x"])
    r = objective_bench.pool([a, b])
    # pooled per-tag means: x 0/4 -> 3/4, y 1/2 -> 1/2; overall = mean over tags: 0.25 -> 0.625
    assert r["images"] == 6 and r["gain"] == pytest.approx(0.375)
    assert r["ci95"][0] <= r["gain"] <= r["ci95"][1]


def test_pool_refuses_mixed_objectives_overlaps_and_old_files(tmp_path):
    import json

    a = _result(tmp_path / "a.json", "kto", [1, 2], [0, 1], [1, 1], ["x", "x"])
    with pytest.raises(SystemExit, match="different objectives"):
        objective_bench.pool([a, _result(tmp_path / "b.json", "dcpo", [3], [0], [1], ["x"])])
    other = _result(tmp_path / "d.json", "kto", [4], [0], [1], ["x"])
    other.write_text(json.dumps({**json.loads(other.read_text()), "settings": ["objective.beta=500"]}))
    with pytest.raises(SystemExit, match="settings"):
        objective_bench.pool([a, other])
    with pytest.raises(SystemExit, match="share images"):
        objective_bench.pool([a, _result(tmp_path / "c.json", "kto", [2], [0], [1], ["x"])])
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"objective": "kto", "model": "toy-sd"}))
    with pytest.raises(SystemExit, match="no per-image judgements in .*old.json"):
        objective_bench.pool([a, old])
