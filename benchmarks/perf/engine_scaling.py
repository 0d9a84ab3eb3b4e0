"""Engines on CPU: throughput and peak memory per process for one process, 2-process DDP and
2-process FSDP2, at the same global batch (interleaved A/B rounds, ratios against one process).

    python -m diffalign.benchmarks.perf.engine_scaling [--width 64] [--steps 6] [--rounds 2]
        [--modes lora,full] [--out runs/engine_scaling]

The denoiser is an SD-architecture UNet widened to ``--width`` base channels (tiny VAE and text
encoder, 32 px) so that weights, gradients and Adam state dominate the per-process memory that the
engines divide differently. Every process runs 1 thread; each configuration is launched fresh
(``accelerate launch`` with configs/accelerate/cpu2.yaml or fsdp_cpu2.yaml). Reported per
configuration (median over rounds): pairs/s of the training loop (``summary.json``, model loading
excluded), the peak RSS of each process, and the trainable-state bytes each process holds (weights,
gradients and two Adam moments of its trainable elements, from the ``state.json`` layout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIGS = {"ddp2": REPO / "configs/accelerate/cpu2.yaml", "fsdp2": REPO / "configs/accelerate/fsdp_cpu2.yaml"}


def build_model(out: Path, width: int) -> Path:
    """The tiny SD pipeline with a wider UNet (2 levels, 2 layers per block)."""
    import diffusers

    from diffalign.models.tiny import build_tiny_pipeline

    if (out / "model_index.json").exists():
        return out
    pipe = build_tiny_pipeline("sd")
    pipe.unet = diffusers.UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def run(kind: str, model: Path, data: Path, out: Path, steps: int, mode: str) -> dict:
    """One training run; returns loop pairs/s, per-process peak RSS (GB) and trainable-state bytes."""
    world = 1 if kind == "single" else 2
    args = [
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        f"train.grad_accum={2 // world}",  # global batch 4 pairs in every configuration
        f"train.checkpoint_every={steps}",
        "objective.beta=2000",
        "train.lr=1e-4",
        "train.report_to=none",
        *(["lora.rank=0"] if mode == "full" else []),
    ]
    cfg = out.parent / f"{out.name}.yaml"
    cfg.write_text("")
    worker = [sys.executable, "-m", "diffalign.benchmarks.perf.engine_scaling", "--worker", str(cfg), *args]
    if world > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[kind])]
        worker = [*launch, "-m", "diffalign.benchmarks.perf.engine_scaling", "--worker", str(cfg), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(worker, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {mode}: {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    layout = json.loads((ckpt / "state.json").read_text())["parameters"]
    rss = [float(p.read_text()) for p in sorted(out.glob("rss-rank*.txt"))]
    return {
        "pairs_per_s": steps * 4 / summary["seconds"],
        "peak_rss_gb": rss,
        "state_mb": layout["local_numel"] * 4 * 4 / 2**20,  # fp32 weight + grad + 2 Adam moments
    }


def worker(argv: list[str]) -> None:
    """Run ``diffalign train`` in this process and record its peak RSS (one file per rank)."""
    from diffalign.cli import main

    code = 1
    try:
        code = main(["train", *argv])
    finally:
        out = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("train.output_dir=")))
        rank = os.environ.get("RANK", "0")
        if out.is_dir():
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
            (out / f"rss-rank{rank}.txt").write_text(f"{rss:.4f}")
    sys.exit(code)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="lora,full")
    ap.add_argument("--out", type=Path, default=Path("runs/engine_scaling"))
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_pairs_parquet

    a.out.mkdir(parents=True, exist_ok=True)
    model = build_model(a.out / "model", a.width)
    data = make_pairs_parquet(a.out / "pairs.parquet", n=16)
    kinds = ("single", "ddp2", "fsdp2")
    results: dict[str, dict[str, list[dict]]] = {m: {k: [] for k in kinds} for m in a.modes.split(",")}
    for r in range(a.rounds):  # interleaved: every configuration once per round, in turn
        for mode in results:
            for kind in kinds:
                out = a.out / f"r{r}-{mode}-{kind}"
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                results[mode][kind].append(run(kind, model, data, out, a.steps, mode))
                print(mode, kind, r, results[mode][kind][-1], flush=True)
    table = {}
    print(
        "\n| mode | engine | processes | pairs/s | x single | peak RSS / process (GB) | x single "
        "| trainable state / process (MB) | x single |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, by_kind in results.items():
        base = None
        for kind, rows in by_kind.items():
            tput = statistics.median(x["pairs_per_s"] for x in rows)
            rss = statistics.median(max(x["peak_rss_gb"]) for x in rows)
            state = rows[0]["state_mb"]
            base = base or (tput, rss, state)
            table[f"{mode}/{kind}"] = {"pairs_per_s": tput, "peak_rss_gb": rss, "state_mb": state}
            n = 1 if kind == "single" else 2
            print(
                f"| {mode} | {kind} | {n} | {tput:.2f} | {tput / base[0]:.2f} | {rss:.2f} | "
                f"{rss / base[1]:.2f} | {state:.1f} | {state / base[2]:.2f} |"
            )
    (a.out / "engine_scaling.json").write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, **table}))


if __name__ == "__main__":
    main()
