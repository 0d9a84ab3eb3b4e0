"""Scaling of a diffalign DPO step: steps/s and peak memory vs batch size, and peak memory vs
dataset size (pairs are read lazily by row group, so memory must stay flat as the data grows).

    python -m diffalign.benchmarks.perf.scaling [--model PIPE] [--batches 1,2,4] [--sizes 200,2000]
        [--steps 4]

Each point runs ``diffalign train`` in its own process (peak RSS is per process). Writes
``scaling.json`` and ``scaling.png`` (two panels) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def point(model: str, data: Path, out: Path, batch: int, steps: int, resolution: int) -> dict:
    from diffalign.config import load_config
    from diffalign.train import train

    t0 = time.perf_counter()
    train(
        load_config(
            None,
            [
                f"model.path={model}",
                f"data.path={data}",
                f"data.resolution={resolution}",
                f"train.output_dir={out}",
                f"train.max_steps={steps}",
                f"train.batch_size={batch}",
                f"train.checkpoint_every={10 * steps}",
                "objective.beta=2000",
            ],
        )
    )
    loop_s = json.loads((out / "summary.json").read_text())["seconds"]
    return {
        "batch": batch,
        "steps_per_s": steps / loop_s,
        "pairs_per_s": steps * batch / loop_s,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def plot(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_batch, by_size = res["by_batch"], res["by_size"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    bs = [r["batch"] for r in by_batch]
    a.plot(bs, [r["pairs_per_s"] for r in by_batch], "o-", label="pairs/s")
    a2 = a.twinx()
    a2.plot(bs, [r["peak_rss_gb"] for r in by_batch], "s--", color="C1", label="peak RSS (GB)")
    a.set_xlabel("batch size (pairs)")
    a.set_ylabel("pairs/s (solid)")
    a2.set_ylabel("peak RSS, GB (dashed)")
    a.set_title("throughput and memory vs batch")
    sizes = [r["pairs"] for r in by_size]
    b.plot(sizes, [r["peak_rss_gb"] for r in by_size], "s-", color="C1")
    b.set_xscale("log")
    b.set_xticks(sizes, [str(n) for n in sizes])
    b.minorticks_off()
    b.set_ylim(0, max(r["peak_rss_gb"] for r in by_size) * 1.3)
    b.set_xlabel("dataset size (pairs)")
    b.set_ylabel("peak RSS (GB)")
    b.set_title("memory vs dataset size (batch 2)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="pipeline (default: the shipped toy-sd)")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--sizes", default="500,5000")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--out", default="runs/perf-scaling")
    ap.add_argument("--point", nargs=3, help=argparse.SUPPRESS)  # internal: DATA BATCH TAG
    args = ap.parse_args(argv)
    from diffalign._quiet import quiet_libraries
    from diffalign.demo import asset

    quiet_libraries()
    model = args.model or asset("toy-sd")
    root = Path(args.out)
    if args.point:
        data, batch, tag = args.point
        r = point(model, Path(data), root / "runs" / tag, int(batch), args.steps, args.resolution)
        print("RESULT " + json.dumps(r))
        return r
    from diffalign.benchmarks.perf.data import write_pairs

    sizes = [int(s) for s in args.sizes.split(",")]
    files = {n: root / f"pairs-{n}.parquet" for n in sizes}
    for n, f in files.items():
        if not f.exists():
            write_pairs(f, n, args.resolution)

    def sub(data: Path, batch: int, tag: str) -> dict:
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "diffalign.benchmarks.perf.scaling",
                "--out",
                str(root),
                "--steps",
                str(args.steps),
                "--resolution",
                str(args.resolution),
                "--model",
                model,
                "--point",
                str(data),
                str(batch),
                tag,
            ],
            capture_output=True,
            text=True,
        )
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise RuntimeError(p.stderr[-3000:])
        return json.loads(line[0][7:])

    by_batch = [sub(files[sizes[0]], b, f"b{b}") for b in (int(x) for x in args.batches.split(","))]
    by_size = [{**sub(f, 2, f"n{n}"), "pairs": n} for n, f in files.items()]
    res = {"model": model, "resolution": args.resolution, "by_batch": by_batch, "by_size": by_size}
    (root / "scaling.json").write_text(json.dumps(res, indent=2))
    plot(res, root / "scaling.png")
    for r in by_batch:
        print(f"batch {r['batch']}: {r['pairs_per_s']:.2f} pairs/s, peak RSS {r['peak_rss_gb']:.2f} GB")
    for r in by_size:
        print(f"{r['pairs']} pairs: peak RSS {r['peak_rss_gb']:.2f} GB")
    return res


if __name__ == "__main__":
    main()
