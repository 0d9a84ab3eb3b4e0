"""benchmarks/perf/gpu_check.py cannot rot: its dry run (the tiny pipelines on the CPU, the same code
path as the real-size run on a GPU: built folders, ``diffalign.train``, worker processes, the FLOP
count, the table) runs here, and the real-size configs it builds have the hub models' sizes. Its
DeepSpeed modes cannot run here (GPU only, and deepspeed is not installed in the test environment):
what is checked is their selection, the launch command (through accelerate's own parser, down to the
engine diffalign picks from the environment it sets), the skip reasons and the engine check."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from diffalign.benchmarks.perf import gpu_check


def _rows(md: str) -> dict[str, list[str]]:
    """Markdown table rows by mode (first cell)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| mode ")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return {c[0]: c for c in cells}


def test_cpu_dry_run_has_a_row_for_every_mode_and_survives_a_dead_worker(tmp_path, monkeypatch):
    """Every mode gets its row; a worker killed inside a mode fails that row with a reason and a
    new worker runs the rest; the FLOPs follow what each step ran (the live reference adds a forward
    per image, a frozen copy included; gradients count 2 forwards with LoRA, 3 in full). By default
    each run is stopped inside its extra step, after the timed ones and before its final checkpoint:
    the run folder has their metrics and no end-of-run summary."""
    monkeypatch.setenv("DIFFALIGN_GPU_CHECK_CRASH", "sdxl-lora-nockpt")
    out, work = tmp_path / "out", tmp_path / "work"
    rows = gpu_check.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--work", str(work), "--out", str(out)]
    )
    assert [r.mode for r in rows] == gpu_check.DEFAULT_MODES  # every mode but the opt-in DeepSpeed ones
    table = _rows((out / "gpu_check.md").read_text())
    assert list(table) == gpu_check.DEFAULT_MODES
    assert json.loads((out / "gpu_check.json").read_text())[0]["mode"] == "sdxl-lora"
    by = {r.mode: r for r in rows}
    crashed = by.pop("sdxl-lora-nockpt")
    assert crashed.status == "failed" and crashed.reason
    assert table["sdxl-lora-nockpt"][-1].startswith("failed: ")
    has_xformers = importlib.util.find_spec("xformers") is not None
    for name, r in by.items():
        if gpu_check.MODES[name].attention == "xformers" and not has_xformers:
            assert r.status == "skipped" and "xformers" in r.reason
            continue
        assert r.status == "ok", (name, r.reason)
        assert r.per_s > 0 and r.step_s > 0 and r.loop_step_s > 0 and r.tflop_per_step > 0, name
        assert table[name][-1] == "ok" and r.checkpoint_s is None and table[name][-2] == "-"
        assert r.engine == table[name][3] == "single", name  # the start-up line of a plain process
        run = work / "runs" / name
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
        assert not (run / "summary.json").exists() and not (run / "checkpoints").exists(), name
    flops = {n: r.tflop_per_step for n, r in by.items()}
    # LoRA: policy 2 forwards' worth per image (with gradients) + live reference 1, or none precomputed
    assert flops["sdxl-lora-preref"] == pytest.approx(flops["sdxl-lora"] * 4 / 6)
    assert flops["flux-lora-preref"] == pytest.approx(flops["flux-lora"] * 4 / 6)
    # full: 3 per image + the frozen copy's 1, or 3 alone with the precomputed reference
    assert flops["sdxl-full"] == pytest.approx(flops["sdxl-full-preref"] * 8 / 6)
    assert flops["sd35m-grpo"] > flops["sd35m-lora"]  # rollout sampling + every trained step


def test_final_checkpoint_option_writes_and_times_it(tmp_path):
    """--final-checkpoint: the runs end by themselves and write their final checkpoint and export
    (LoRA and full fine-tuning), whose time gets its column; each is deleted after its row (disk)."""
    work, out = tmp_path / "work", tmp_path / "out"
    modes = ["sdxl-lora", "sd35m-full-preref"]
    rows = gpu_check.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--final-checkpoint", "--modes", ",".join(modes)]
        + ["--work", str(work), "--out", str(out)]
    )
    assert [(r.mode, r.status) for r in rows] == [(m, "ok") for m in modes], [r.reason for r in rows]
    table = _rows((out / "gpu_check.md").read_text())
    for r in rows:
        assert r.checkpoint_s > 0 and float(table[r.mode][-2]) >= 0
        run = work / "runs" / r.mode
        assert json.loads((run / "summary.json").read_text())["steps"] == 2  # warm-up + timed, no extra
        assert not (run / "checkpoints").exists()


def test_a_spent_budget_skips_modes_and_still_prints_the_table(tmp_path, capsys):
    rows = gpu_check.main(
        ["--tiny", "--device", "cpu", "--budget-s", "0", "--modes", "sdxl-lora,flux-lora"]
        + ["--work", str(tmp_path / "work")]
    )
    assert [(r.mode, r.status) for r in rows] == [("sdxl-lora", "skipped"), ("flux-lora", "skipped")]
    assert "time budget" in rows[0].reason
    assert len(_rows(capsys.readouterr().out)) == 2


@pytest.mark.parametrize(("family", "billions"), [("sdxl", 2.57), ("sd35m", 2.24), ("flux", 11.90)])
def test_the_real_size_denoisers_are_the_hub_sizes(family, billions):
    """The configs the GPU run builds, on the meta device (nothing allocated); SD3.5-M and FLUX.1-dev
    as counted in shared/reference/model-families.md, the SDXL base UNet's 2.57 B."""
    import diffusers

    cls, config = gpu_check.REAL_DENOISERS[family]
    with torch.device("meta"):
        model = getattr(diffusers, cls)(**config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


# ----------------------------------------------------------------------------- DeepSpeed modes

DS_MODES = ["sdxl-lora-zero2", "sdxl-lora-zero3"]


def test_deepspeed_modes_are_opt_in_sdxl_lora_steps():
    """Two modes, the plain SDXL LoRA DPO step under ZeRO-2 / ZeRO-3; not in the default set (the
    budget already skips its FLUX modes), selected by name or with 'all', in the order given."""
    assert [n for n, m in gpu_check.MODES.items() if m.zero] == DS_MODES
    for name, zero in zip(DS_MODES, (2, 3), strict=True):
        assert gpu_check.MODES[name] == gpu_check.Mode("sdxl", zero=zero)
        assert gpu_check.launch_config(name).is_file()
    assert gpu_check.launch_config("sdxl-lora") is None
    assert gpu_check.DEFAULT_MODES == [n for n in gpu_check.MODES if n not in DS_MODES]
    assert gpu_check.parse_args([]).modes == gpu_check.DEFAULT_MODES
    assert gpu_check.parse_args(["--modes", "all"]).modes == list(gpu_check.MODES)
    picked = gpu_check.parse_args(["--modes", "sdxl-lora-zero3, sdxl-lora"]).modes
    assert picked == ["sdxl-lora-zero3", "sdxl-lora"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--modes", "sdxl-lora-zero1"])
    # a DeepSpeed mode runs in a worker of its own; the plain ones around it share theirs
    pending = ["sdxl-lora", "sdxl-lora-xformers", "sdxl-lora-zero2", "sdxl-lora-zero3", "sdxl-full"]
    batches = []
    while pending:
        batches.append(gpu_check.next_batch(pending))
        pending = pending[len(batches[-1]) :]
    assert batches == [
        ["sdxl-lora", "sdxl-lora-xformers"],
        ["sdxl-lora-zero2"],
        ["sdxl-lora-zero3"],
        ["sdxl-full"],
    ]


def test_list_names_the_launch_config(capsys):
    gpu_check.main(["--list"])
    lines = {ln.split(":", 1)[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(gpu_check.MODES)
    assert "accelerate launch configs/accelerate/deepspeed_zero3.yaml (opt-in)" in lines["sdxl-lora-zero3"]
    assert "accelerate launch" not in lines["sdxl-lora"]


@pytest.mark.parametrize(("name", "zero"), [("sdxl-lora-zero2", 2), ("sdxl-lora-zero3", 3)])
def test_deepspeed_worker_command_is_an_accelerate_launch(name, zero, tmp_path, monkeypatch):
    """The worker of a DeepSpeed mode is ``accelerate launch --config_file deepspeed_zero<N>.yaml
    --num_processes 1 -m ...gpu_check --worker ...``: accelerate's own parser and validation read it
    as a one-process DeepSpeed launch of that stage, the environment it would set makes diffalign
    pick its deepspeed engine (given CUDA), the worker's own arguments come through intact, and the
    run's overrides ask for train.grad_accum=1."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from diffalign.config import load_config
    from diffalign.errors import ConfigError
    from diffalign.train import engines

    args = gpu_check.parse_args(["--modes", name, "--work", str(tmp_path)])
    args.deadline = 1234.5
    cmd = gpu_check._worker_cmd(args, [name], tmp_path / "r.jsonl", ["sdxl", "sdxl"])
    config = gpu_check.REPO / "configs" / "accelerate" / f"deepspeed_zero{zero}.yaml"
    assert cmd[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]

    launch, defaults, mp_flag = _validate_launch_command(launch_command_parser().parse_args(cmd[3:]))
    assert launch.use_deepspeed and not launch.cpu and launch.zero_stage == zero  # deepspeed_launcher's
    # what launch_command sets before it calls deepspeed_launcher (which needs deepspeed installed)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_flag else [])
    launch.deepspeed_fields_from_accelerate_config = ",".join(fields)
    assert launch.num_processes == 1 and launch.num_machines == 1
    assert launch.module and launch.training_script == "diffalign.benchmarks.perf.gpu_check"
    _, env = prepare_deepspeed_cmd_env(launch)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(zero)
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "1"
    env["WORLD_SIZE"] = str(launch.num_processes)  # what torchrun adds
    with pytest.raises(ConfigError, match="needs CUDA"):  # here: refused, never another engine
        engines.engine_from_launch(env)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engines.engine_from_launch(env) == engines.Engine("deepspeed", 1)

    worker = gpu_check.parse_args(launch.training_script_args)
    assert worker.worker and worker.modes == [name] and worker.deadline == 1234.5
    assert worker.keep_families == ["sdxl"] and worker.work == tmp_path.resolve()
    run_dir = tmp_path / "run"
    ovr = gpu_check.overrides(
        name, tmp_path / "m", (tmp_path / "p.parquet", tmp_path / "p.txt"), run_dir, worker
    )
    assert "train.grad_accum=1" in ovr and "lora.rank=8" in ovr and "train.mixed_precision=bf16" in ovr
    assert load_config(None, ovr).train.grad_accum == 1
    plain = gpu_check._worker_cmd(args, ["sdxl-lora"], tmp_path / "r.jsonl")
    assert plain[:4] == [sys.executable, "-m", "diffalign.benchmarks.perf.gpu_check", "--worker"]
    assert "--keep-families" not in plain


def test_deepspeed_skip_reasons(monkeypatch, tmp_path):
    cpu = gpu_check.parse_args(["--device", "cpu", "--work", str(tmp_path)])
    cuda = gpu_check.parse_args(["--work", str(tmp_path)])
    monkeypatch.setattr(gpu_check, "_has_deepspeed", lambda: False)
    assert "deepspeed is not installed" in gpu_check.deepspeed_skip_reason("sdxl-lora-zero2", cuda)
    monkeypatch.setattr(gpu_check, "_has_deepspeed", lambda: True)
    assert "needs CUDA" in gpu_check.deepspeed_skip_reason("sdxl-lora-zero3", cpu)
    assert gpu_check.deepspeed_skip_reason("sdxl-lora-zero3", cuda) is None
    assert gpu_check.deepspeed_skip_reason("sdxl-lora", cpu) is None
    # the budget estimate: a plain SDXL mode + the launcher and engine start, + the build if not built
    assert gpu_check.mode_need_s("sdxl-lora-zero2", cuda) == pytest.approx(
        gpu_check.mode_need_s("sdxl-lora", cuda) + gpu_check.DEEPSPEED_EXTRA_S
    )


def test_deepspeed_modes_are_skipped_without_a_worker_when_deepspeed_is_missing(tmp_path, monkeypatch):
    """No launcher is started for a mode that cannot run; its row says why and the table has it."""
    monkeypatch.setattr(gpu_check, "_has_deepspeed", lambda: False)
    work, out = tmp_path / "work", tmp_path / "out"
    rows = gpu_check.main(
        ["--tiny", "--device", "cpu", "--modes", ",".join(DS_MODES), "--work", str(work), "--out", str(out)]
    )
    assert [(r.mode, r.status) for r in rows] == [(m, "skipped") for m in DS_MODES]
    assert all("deepspeed is not installed" in r.reason for r in rows)
    assert not list(work.glob("worker-*"))
    table = _rows((out / "gpu_check.md").read_text())
    assert table["sdxl-lora-zero3"][3] == "-" and table["sdxl-lora-zero3"][-1].startswith(
        "skipped: deepspeed"
    )


def test_engine_cell_and_check():
    """The start-up line is read from what train() prints (in pieces, as print writes it); a
    DeepSpeed mode fails unless DeepSpeed ran at its config's stage."""
    import io

    sink = io.StringIO()
    watch = gpu_check.EngineLine(sink)
    for part in ["loading\nengine: deep", "speed (1 processes on cuda)", "\nengine: later\n"]:
        print(part, end="", file=watch)
    assert watch.line == "deepspeed (1 processes on cuda)" and sink.getvalue().startswith("loading\nengine")
    assert gpu_check.engine_started(watch.line, 3) == "deepspeed ZeRO-3"
    assert gpu_check.engine_started("single process on cuda", None) == "single"
    assert gpu_check.engine_started(None, None) == "?"
    gpu_check.check_engine("sdxl-lora-zero3", watch.line, 3)
    gpu_check.check_engine("sdxl-lora", "single process on cuda", None)
    with pytest.raises(RuntimeError, match="started engine: single process on cuda"):
        gpu_check.check_engine("sdxl-lora-zero2", "single process on cuda", None)
    with pytest.raises(RuntimeError, match="ZeRO stage 2"):
        gpu_check.check_engine("sdxl-lora-zero3", watch.line, 2)


def test_a_dry_run_with_a_deepspeed_mode_between_plain_ones(tmp_path):
    """The plain modes around a skipped DeepSpeed one run in their own workers (the family's folder
    is kept for the later one and removed after it)."""
    work = tmp_path / "work"
    modes = ["sdxl-lora", "sdxl-lora-zero2", "sdxl-lora-preref"]
    rows = gpu_check.main(
        ["--tiny", "--device", "cpu", "--steps", "1", "--modes", ",".join(modes), "--work", str(work)]
    )
    by = {r.mode: r for r in rows}
    assert [r.mode for r in rows] == modes
    assert by["sdxl-lora"].status == by["sdxl-lora-preref"].status == "ok", [r.reason for r in rows]
    assert by["sdxl-lora-zero2"].status == "skipped" and by["sdxl-lora-zero2"].reason
    logs = [f.read_text() for f in sorted(work.glob("worker-*.log"))]
    assert len(logs) == 2
    assert "built the sdxl folder" in logs[0] and "built the sdxl folder" not in logs[1]
    assert not (work / "models" / "sdxl").exists()
