"""Evaluation generation: the harness's batched generation (prompts x seeds in one call, one
generator per image) vs calling the pipeline once per image, same pipeline, prompts, seeds,
steps and guidance, in one process; checks the images agree.

    python -m diffalign.benchmarks.perf.eval_bench [--model PIPE] [--prompts 16] [--per-prompt 4] [--steps 15]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    from diffalign._quiet import quiet_libraries
    from diffalign.benchmarks.toyworlds.evaluate import generate, image_seed
    from diffalign.benchmarks.toyworlds.shapes import prompts
    from diffalign.demo import asset
    from diffalign.models.loading import load_pipeline

    quiet_libraries()
    pipe, call_kw = load_pipeline(args.model or asset("toy-sd"))
    pipe.set_progress_bar_config(disable=True)
    metas = prompts("heldout", args.prompts, 0)
    texts = [m["prompt"] for m in metas for _ in range(args.per_prompt)]
    seeds = [image_seed(0, i, j) for i in range(len(metas)) for j in range(args.per_prompt)]
    generate(pipe, texts[:2], seeds[:2], 2, args.guidance, args.batch, **call_kw)  # warm-up
    t0 = time.perf_counter()
    batched = generate(pipe, texts, seeds, args.steps, args.guidance, args.batch, **call_kw)
    t_b = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = []
    for text, s in zip(texts, seeds, strict=True):
        with torch.inference_mode():
            img = pipe(
                text,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                generator=torch.Generator().manual_seed(s),
                output_type="np",
                **call_kw,
            ).images[0]
        single.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
    t_s = time.perf_counter() - t0
    diff = float(np.abs(np.stack(single).astype(int) - np.asarray(batched).astype(int)).mean())
    res = {
        "images": len(texts),
        "per_image_img_s": len(texts) / t_s,
        "batched_img_s": len(texts) / t_b,
        "ratio": t_s / t_b,
        "mean_abs_pixel_diff": diff,
    }
    print(
        f"{len(texts)} images, {args.steps} steps: one call per image {res['per_image_img_s']:.1f} img/s, "
        f"batched {res['batched_img_s']:.1f} img/s, ratio {res['ratio']:.2f}x; "
        f"mean |pixel diff| {diff:.3f} / 255"
    )
    return res


if __name__ == "__main__":
    main()
