"""benchmarks/perf/gpu_check.py cannot rot: its dry run (the tiny pipelines on the CPU, the same code
path as the real-size run on a GPU: built folders, ``diffalign.train``, worker processes, the FLOP
count, the table) runs here, and the real-size configs it builds have the hub models' sizes."""

from __future__ import annotations

import importlib.util
import json

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
    assert [r.mode for r in rows] == list(gpu_check.MODES)
    table = _rows((out / "gpu_check.md").read_text())
    assert list(table) == list(gpu_check.MODES)
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
