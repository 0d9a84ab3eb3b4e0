"""Syn-Pic throughput: ``diffalign synpic`` (prompts batched, CFG halves in one forward, rewards
batched) vs the baseline of calling the diffusers pipeline once per prompt and scoring each
prompt's images separately, same models, settings and seeds, in one process.

    python -m diffalign.benchmarks.perf.synpic_bench --generator PATH --reward pickscore=PATH [--prompts 32]

Prints images/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generator", action="append", required=True)
    ap.add_argument("--reward", action="append", required=True)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=15)
    args = ap.parse_args(argv)

    from diffalign._quiet import quiet_libraries
    from diffalign.benchmarks.toyworlds.shapes import prompts as shapes_prompts
    from diffalign.models.loading import load_pipeline
    from diffalign.rewards import load_rewards
    from diffalign.synpic import SynPicConfig, image_seed, run_synpic

    quiet_libraries()
    texts = list(dict.fromkeys(m["prompt"] for m in shapes_prompts("train", 20 * args.prompts, 0)))[
        : args.prompts
    ]
    n_images = len(texts) * args.k * len(args.generator)
    with tempfile.TemporaryDirectory() as tmp:
        pf = Path(tmp) / "p.txt"
        pf.write_text("\n".join(texts))
        # warm-up (imports, first-call allocations) outside the timings
        pipes = [load_pipeline(g) for g in args.generator]
        rewards = load_rewards(args.reward)
        t0 = time.perf_counter()
        for gi, (pipe, kw) in enumerate(pipes):
            for pi, text in enumerate(texts):
                gens = [torch.Generator().manual_seed(image_seed(0, pi, gi, j)) for j in range(args.k)]
                imgs = pipe(
                    text,
                    num_images_per_prompt=args.k,
                    num_inference_steps=args.steps,
                    guidance_scale=5.0,
                    generator=gens,
                    output_type="np",
                    **kw,
                ).images
                x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2).float()
                for r in rewards.values():
                    r(x, [text] * args.k)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_synpic(
            SynPicConfig(
                prompts=str(pf),
                generators=args.generator,
                rewards=args.reward,
                out=str(Path(tmp) / "out"),
                images_per_generator=args.k,
                steps=args.steps,
                guidance=5.0,
                shard_size=len(texts),
                batch_prompts=len(texts),
            )
        )
        ours = time.perf_counter() - t0
    res = {
        "images": n_images,
        "baseline_img_per_s": n_images / base,
        "synpic_img_per_s": n_images / ours,
        "ratio": base / ours,
    }
    print(
        f"images: {n_images}  baseline (pipeline per prompt): {res['baseline_img_per_s']:.2f} img/s  "
        f"synpic: {res['synpic_img_per_s']:.2f} img/s  ratio synpic/baseline: {res['ratio']:.2f}x"
    )
    return res


if __name__ == "__main__":
    main()
