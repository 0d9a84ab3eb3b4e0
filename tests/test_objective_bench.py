"""The objective benchmark's command line (the benchmark itself runs for ~30 min; see benchmarks/RESULTS.md)."""

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
