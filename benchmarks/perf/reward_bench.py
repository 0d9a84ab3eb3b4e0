"""Reward scoring throughput: one batched call vs one image at a time, same reward, same images,
in one process (the one-at-a-time loop is how ``hpsv2.score`` and ImageReward's ``score`` run).

    python -m diffalign.benchmarks.perf.reward_bench [--reward pickscore=PATH] [--images 256]
        [--batch-size 64] [--size 512] [--preprocess new|old|both]

Defaults to the shipped toy CLIP (``toy-clip-a``) on ShapesWorld renders at 32x32 (``--size`` renders
larger ones, e.g. 512 for real image sizes). Prints images/s for both and the ratio; checks that both
give the same scores. ``--preprocess old`` swaps in the preprocessing used before issue #25 (float
antialiased bicubic, no quantisation or clamping; CLIP-family rewards only) to time it side by side;
``both`` runs new then old in one process.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv: list[str] | None = None) -> dict[str, float]:
    from diffalign.demo import ASSETS

    ap = argparse.ArgumentParser()
    ap.add_argument("--reward", default=f"pickscore={ASSETS / 'toy-clip-a'}")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=32, help="render size of the ShapesWorld images (px)")
    ap.add_argument("--preprocess", choices=["new", "old", "both"], default="new")
    args = ap.parse_args(argv)

    from diffalign._quiet import quiet_libraries
    from diffalign.benchmarks.toyworlds.shapes import make_dataset
    from diffalign.rewards import load_rewards

    quiet_libraries()
    data = list(make_dataset(args.images, seed=0, split="train", size=args.size))
    imgs = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _, _ in data])
    texts = [caption for _, caption, _ in data]
    reward = next(iter(load_rewards([args.reward]).values()))

    def timed(bs: int) -> tuple[float, torch.Tensor]:
        reward.batch_size = bs
        reward(imgs[:bs], texts[:bs])  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = reward(imgs, texts).scores
            best = min(best, time.perf_counter() - t0)
        return len(texts) / best, out

    res: dict[str, float] = {"images": len(texts)}
    for which in ("new", "old") if args.preprocess == "both" else (args.preprocess,):
        if which == "old":
            if not hasattr(reward, "pre") or "crop" not in reward.pre or type(reward).__name__ == "HPSv2":
                raise SystemExit(
                    "--preprocess old: CLIP-family rewards (pickscore, clip_score, aesthetic) only"
                )
            reward.preprocess = lambda im, r=reward: old_clip_preprocess(im, r.pre)
        single, s1 = timed(1)
        batched, sb = timed(args.batch_size)
        torch.testing.assert_close(s1, sb, atol=1e-4, rtol=1e-4)
        tag = "" if which == "new" else "old_"
        res |= {
            f"{tag}one_at_a_time_img_s": single,
            f"{tag}batched_img_s": batched,
            f"{tag}ratio": batched / single,
        }
        print(
            f"reward {args.reward.split('=')[0]} ({which} preprocessing) on {len(texts)} images of "
            f"{args.size}px, {torch.get_num_threads()} threads: one at a time {single:.0f} img/s, "
            f"batched ({args.batch_size}) {batched:.0f} img/s, ratio {batched / single:.2f}x"
        )
    return res


def old_clip_preprocess(images: torch.Tensor, pre: dict) -> torch.Tensor:
    """The CLIP-family preprocessing before issue #25, for timing only: float antialiased bicubic on
    the unquantised image, no clamping; ``[B,3,H,W]`` -> ``[B,3,crop,crop]``."""
    import torch.nn.functional as F

    size, crop = pre["size"], pre["crop"]
    H, W = images.shape[-2:]
    if min(H, W) != size:
        nh, nw = (size, int(size * W / H)) if H <= W else (int(size * H / W), size)
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    H, W = images.shape[-2:]
    top, left = (H - crop) // 2, (W - crop) // 2
    images = images[..., top : top + crop, left : left + crop]
    m = torch.tensor(pre["mean"], device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(pre["std"], device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


if __name__ == "__main__":
    main()
