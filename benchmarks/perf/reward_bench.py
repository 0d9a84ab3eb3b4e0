"""Reward scoring throughput: one batched call vs one image at a time, same reward, same images,
in one process (the one-at-a-time loop is how ``hpsv2.score`` and ImageReward's ``score`` run).

    python -m diffalign.benchmarks.perf.reward_bench [--reward pickscore=PATH] [--images 256] [--batch-size 64]

Defaults to the shipped toy CLIP (``toy-clip-a``) on ShapesWorld renders at 32x32. Prints
images/s for both and the ratio; checks that both give the same scores.
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
    args = ap.parse_args(argv)

    from diffalign._quiet import quiet_libraries
    from diffalign.benchmarks.toyworlds.shapes import make_dataset
    from diffalign.rewards import load_rewards

    quiet_libraries()
    data = list(make_dataset(args.images, seed=0, split="train", size=32))
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

    single, s1 = timed(1)
    batched, sb = timed(args.batch_size)
    torch.testing.assert_close(s1, sb, atol=1e-4, rtol=1e-4)
    res = {
        "images": len(texts),
        "one_at_a_time_img_s": single,
        "batched_img_s": batched,
        "ratio": batched / single,
    }
    print(
        f"reward {args.reward.split('=')[0]} on {len(texts)} images, {torch.get_num_threads()} threads: "
        f"one at a time {single:.0f} img/s, batched ({args.batch_size}) {batched:.0f} img/s, ratio {batched / single:.2f}x"
    )
    return res


if __name__ == "__main__":
    main()
