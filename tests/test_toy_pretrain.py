"""`diffalign toy pretrain --quick`: every stage runs, checkpoints, resumes and exports loadable pipelines."""

from __future__ import annotations

import json
import subprocess
import sys

import torch


def test_quick_pretrain_exports_loadable_pipelines(tmp_path):
    work, out = tmp_path / "work", tmp_path / "models"
    cmd = [sys.executable, "-m", "diffalign.cli", "toy", "pretrain", "--quick", "--work", str(work), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    first = json.loads((work / "sd3" / "meta.json").read_text())
    # rerunning continues from the checkpoint instead of starting over
    p = subprocess.run(cmd + ["--stages", "sd3"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((work / "sd3" / "meta.json").read_text())["steps"] > first["steps"]

    from diffalign.models import load_pipeline

    for name in ("toy-sd", "toy-sd3"):
        pipe, kw = load_pipeline(out / name)
        img = pipe(["a photo of a red circle"], num_inference_steps=2, output_type="pt",
                   generator=torch.Generator().manual_seed(0), **kw).images
        assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert json.loads((out / "toy-sd3" / "diffalign.json").read_text())["call_defaults"] == {"max_sequence_length": 0}
