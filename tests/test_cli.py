from __future__ import annotations

import subprocess
import sys

from conftest import make_pairs_parquet


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "diffalign.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def test_ls_objectives():
    out = cli("ls", "objectives")
    assert out.returncode == 0 and "diffusion_dpo" in out.stdout and "sft" in out.stdout


def test_user_errors_are_one_line(tmp_path, pairs_parquet):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: /no/such/model\ndata:\n  path: {pairs_parquet}\n  resolution: 32\n")
    cases = [
        (
            ["validate", str(cfg), "objective.name=difusion_dpo"],
            "unknown objective 'difusion_dpo'. Did you mean 'diffusion_dpo'",
        ),
        (["validate", str(cfg), "train.optimizr=adamw"], "unknown config key 'train.optimizr'"),
        (
            ["train", str(cfg), f"train.output_dir={tmp_path / 'r'}"],
            "model.path '/no/such/model' does not exist",
        ),
        (["validate", str(tmp_path / "missing.yaml")], "config file"),
    ]
    for args, message in cases:
        out = cli(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and message in lines[-1], lines
        assert "Traceback" not in out.stderr


def test_plugins_register_names_before_the_config_is_checked(tmp_path, tiny_models):
    """A reward registered by a module outside the core (the toy judge) is unknown to ``validate``
    until ``--plugin`` imports that module; a plugin that cannot be imported is one error line."""
    meta = tmp_path / "prompts.jsonl"
    meta.write_text(
        '{"prompt": "a red circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n'
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    args = [
        "validate",
        str(cfg),
        f"model.path={tiny_models['sd3']}",
        f"data.path={meta}",
        "data.resolution=32",
        "objective.name=flow_grpo",
        f"objective.rewards=shapes_partial={meta}",
    ]
    out = cli(*args)
    assert out.returncode == 2 and "unknown reward 'shapes_partial'" in out.stderr.splitlines()[-1]
    out = cli(*args, "--plugin", "diffalign.benchmarks.toyworlds.judge_reward")
    assert out.returncode == 0 and out.stdout.startswith("ok:"), out.stderr[-2000:]
    out = cli(*args, "--plugin", "no_such_rewards_module")
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and lines[-1].startswith(
        "error: --plugin no_such_rewards_module: cannot import"
    )
    assert "Traceback" not in out.stderr


def test_bad_data_via_cli(tmp_path, tiny_models):
    bad = make_pairs_parquet(tmp_path / "bad.parquet", n=3, labels=[1.0, 2.0, 0.0])
    (tmp_path / "e.yaml").write_text("")
    out = cli(
        "train",
        str(tmp_path / "e.yaml"),
        f"model.path={tiny_models['sd']}",
        f"data.path={bad}",
        "data.resolution=32",
        f"train.output_dir={tmp_path / 'r'}",
    )
    assert out.returncode == 2 and "bad.parquet row 1: label_0=2.0 is not one of 0, 0.5, 1" in out.stderr


def test_tiny_then_train_through_the_console(tmp_path, pairs_parquet):
    assert cli("tiny", "sd3", str(tmp_path / "m")).returncode == 0
    (tmp_path / "e.yaml").write_text("")
    out = cli(
        "train",
        str(tmp_path / "e.yaml"),
        f"model.path={tmp_path / 'm'}",
        f"data.path={pairs_parquet}",
        "data.resolution=32",
        f"train.output_dir={tmp_path / 'r'}",
        "train.max_steps=2",
        "objective.beta=100",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        tmp_path / "r" / "checkpoints" / "step-000002" / "export" / "pytorch_lora_weights.safetensors"
    ).exists()


def test_every_command_explains_its_arguments_with_an_example():
    """train/validate/cache/label say what they do, what each argument is, and show an example line."""
    for cmd in ("train", "validate", "cache", "label"):
        out = cli(cmd, "--help")
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "example" in text and f"diffalign {cmd} " in text.split("example", 1)[1], (cmd, text)
        described = text.split("positional arguments:", 1)[1]
        for arg in ("config", "overrides") if cmd != "label" else ("data", "out", "--reward"):
            line = next(ln for ln in described.splitlines() if ln.strip().startswith(arg))
            # an argument's help is on its line (or the next, when the name is long)
            following = described.split(line, 1)[1].splitlines()[1] if line.strip() == arg else line
            assert len((line + following).split()) > 3, (cmd, arg, line)


def test_ls_lists_rewards_and_samplers():
    rewards, samplers = cli("ls", "rewards"), cli("ls", "samplers")
    assert rewards.returncode == 0 and "pickscore" in rewards.stdout and "hpsv2" in rewards.stdout
    assert samplers.returncode == 0 and "ddim" in samplers.stdout and "flow_euler" in samplers.stdout


def test_hub_dataset_id_offline_is_one_line_in_validate_and_train(tmp_path, tiny_models):
    import os

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tiny_models['sd']}\ndata:\n  path: no-such-org/no-such-pairs\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for cmd in ("validate", "train"):
        out = subprocess.run(
            [sys.executable, "-m", "diffalign.cli", cmd, str(cfg), f"train.output_dir={tmp_path / 'r'}"],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1]
        assert "no-such-org/no-such-pairs" in last and "not in the local cache" in last, last
    # a folder that exists but is no dataset fails in one line at load time, naming the path
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "dataset_info.json").write_text("{not json")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffalign.cli",
            "train",
            str(cfg),
            f"data.path={broken}",
            f"train.output_dir={tmp_path / 'r2'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert str(broken) in out.stderr.splitlines()[-1]
