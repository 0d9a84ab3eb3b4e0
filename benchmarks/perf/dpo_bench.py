"""A Diffusion-DPO training step: the reference scripts' way vs diffalign's defaults, side by side.

    python -m diffalign.benchmarks.perf.dpo_bench [--ft lora|full] [--width 0.5] [--resolution 256]
        [--batch 2] [--steps 5]

Builds (once, random weights) an SD1.5-architecture pipeline scaled down in width only (same UNet
block structure, VAE and CLIP text encoder shapes scaled by ``--width``) and a pairs parquet, then
runs each mode in its own process (so peak RSS is per mode) on the same config, batch, resolution
and data:

- ``baseline``: the per-step work of the diffusers / official Diffusion-DPO scripts -- decode both
  images, VAE-encode them and run the text encoder every step; the reference is a separate forward
  under ``no_grad`` (LoRA: adapters toggled off; full fine-tuning: a frozen copy of the UNet);
  AdamW.
- ``diffalign``: ``diffalign train`` with latents and text embeddings from ``diffalign cache``
  (VAE and text encoder never loaded) and ``train.precompute_reference`` (no reference model or
  forward during training); full fine-tuning also shown with Adafactor (the official SDXL
  recipe's optimiser).

Prints pairs/s and peak RSS per mode and the ratios against baseline. The cache build and the
reference pre-pass are one-off costs (the cache is reused across runs and objectives) and are
reported separately, plus pairs/s with the pre-pass included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def build(root: Path, width: float, n_pairs: int, resolution: int) -> tuple[Path, Path]:
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    pipe_dir, data = root / "sd15-scaled", root / "pairs.parquet"
    if not (pipe_dir / "model_index.json").exists():
        torch.manual_seed(0)
        ch = lambda c: max(32, int(round(c * width / 32)) * 32)  # noqa: E731  (keep GroupNorm(32) valid)
        cross = ch(768)
        unet = UNet2DConditionModel(  # runwayml/stable-diffusion-v1-5 unet/config.json, widths scaled
            sample_size=resolution // 8,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=tuple(ch(c) for c in (320, 640, 1280, 1280)),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=tuple(ch(c) for c in (128, 256, 512, 512)),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        tok = build_clip_tokenizer(WORDS)
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tok),
                hidden_size=cross,
                intermediate_size=4 * cross,
                num_hidden_layers=12,
                num_attention_heads=max(1, cross // 64),
                max_position_embeddings=77,
                eos_token_id=tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
                pad_token_id=tok.eos_token_id,
            )
        )
        sched = DDPMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            clip_sample=False,
        )
        StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tok,
            unet=unet,
            scheduler=sched,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ).save_pretrained(str(pipe_dir))
    if not data.exists():
        from diffalign.benchmarks.perf.data import write_pairs

        write_pairs(data, n_pairs, resolution)
    return pipe_dir, data


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_baseline(
    pipe_dir: Path, data: Path, ft: str, batch: int, steps: int, resolution: int, beta: float
) -> dict:
    """The reference scripts' per-step work, written out explicitly."""
    import copy

    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from diffalign.config import DataConfig
    from diffalign.data.pairs import PairDataset, collate

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    te.requires_grad_(False)
    ref_unet = None
    if ft == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=8,
                lora_alpha=8,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
    else:
        ref_unet = copy.deepcopy(unet).requires_grad_(False)  # Salesforce train.py's ref_unet
        unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ds = PairDataset(DataConfig(path=str(data), resolution=resolution), verbose=False)
    g = torch.Generator().manual_seed(0)
    unet.train()
    t0 = time.perf_counter()
    for step in range(steps):
        items = collate(
            [
                ds[(int(i), step * 1000 + j)]
                for j, i in enumerate(torch.randint(0, len(ds), (batch,), generator=g))
            ]
        )
        pix = items["pixels"].flatten(0, 1)  # [2B,3,R,R] winners and losers interleaved
        with torch.no_grad():
            latents = vae.encode(pix).latent_dist.sample() * vae.config.scaling_factor
            ids = tok(
                items["caption"],
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            emb = te(ids)[0].repeat_interleave(2, 0)
        noise = torch.randn(latents[::2].shape, generator=g).repeat_interleave(2, 0)
        ts = torch.randint(0, 1000, (batch,), generator=g).repeat_interleave(2, 0)
        noisy = sched.add_noise(latents, noise, ts)
        pred = unet(noisy, ts, emb).sample
        err = (pred.float() - noise.float()).pow(2).mean(dim=[1, 2, 3]).view(-1, 2)
        with torch.no_grad():
            if ref_unet is None:
                unet.disable_adapters()
                ref = unet(noisy, ts, emb).sample
                unet.enable_adapters()
            else:
                ref = ref_unet(noisy, ts, emb).sample
        rerr = (ref.float() - noise.float()).pow(2).mean(dim=[1, 2, 3]).view(-1, 2)
        inside = -0.5 * beta * ((err[:, 0] - rerr[:, 0]) - (err[:, 1] - rerr[:, 1]))
        loss = -F.logsigmoid(inside).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "mode": "baseline",
        "ft": ft,
        "pairs_per_s": steps * batch / dt,
        "seconds": dt,
        "peak_rss_gb": peak_rss_gb(),
    }


ABLATIONS = {  # each switch on its own, against the diffalign defaults
    "no cache": ["data.cache_dir=null"],
    "live reference": ["train.precompute_reference=false"],
    "+ gradient checkpointing": ["train.gradient_checkpointing=true"],
    "+ channels_last": ["train.channels_last=true"],
    "+ torch.compile": ["train.compile=true"],
}


def run_diffalign(
    pipe_dir: Path,
    data: Path,
    ft: str,
    batch: int,
    steps: int,
    resolution: int,
    beta: float,
    optimizer: str,
    out: Path,
    ablation: str | None = None,
) -> dict:
    from diffalign.config import load_config
    from diffalign.train import train

    ovs = [
        f"model.path={pipe_dir}",
        f"data.path={data}",
        f"data.resolution={resolution}",
        f"data.cache_dir={out.parent / 'cache'}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        f"train.batch_size={batch}",
        "train.lr=1e-5",
        f"objective.beta={beta}",
        "train.precompute_reference=true",
        f"train.checkpoint_every={10 * steps}",
        f"train.optimizer={optimizer}",
        "train.keep_checkpoints=1",
    ]
    ovs += ["lora.rank=8"] if ft == "lora" else ["lora.rank=0"]
    if ablation:
        ovs += ABLATIONS[ablation]
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    train(load_config(None, ovs))
    total = time.perf_counter() - t0
    loop_s = json.loads((out / "summary.json").read_text())["seconds"]
    return {
        "mode": f"diffalign ({optimizer})" + (f" {ablation}" if ablation else ""),
        "ft": ft,
        "pairs_per_s": steps * batch / loop_s,
        "seconds": loop_s,
        "pairs_per_s_incl_prepass": steps * batch / total,
        "peak_rss_gb": peak_rss_gb(),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ft", choices=["lora", "full"], default="lora")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--beta", type=float, default=5000.0)
    ap.add_argument("--root", default="runs/perf-dpo")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # internal: one mode in this process
    ap.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    ap.add_argument(
        "--ablations", action="store_true", help="also time each optimisation switched on/off alone"
    )
    ap.add_argument("--ablation", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    pipe_dir, data = build(root, args.width, args.pairs, args.resolution)
    if args.run:
        from diffalign._quiet import quiet_libraries

        quiet_libraries()
        if args.run == "baseline":
            res = run_baseline(pipe_dir, data, args.ft, args.batch, args.steps, args.resolution, args.beta)
        else:
            res = run_diffalign(
                pipe_dir,
                data,
                args.ft,
                args.batch,
                args.steps,
                args.resolution,
                args.beta,
                args.optimizer,
                root / f"run-{args.ft}-{args.optimizer}",
                args.ablation,
            )
        print("RESULT " + json.dumps(res))
        return [res]

    # the one-off cache build, timed
    from diffalign.config import load_config

    t0 = time.perf_counter()
    cache = root / "cache"
    if not (cache / "index.json").exists():
        from diffalign.data.cache import build_cache

        build_cache(
            load_config(
                None,
                [
                    f"model.path={pipe_dir}",
                    f"data.path={data}",
                    f"data.resolution={args.resolution}",
                    f"data.cache_dir={cache}",
                ],
            )
        )
    cache_s = time.perf_counter() - t0
    common = [
        "--ft",
        args.ft,
        "--width",
        str(args.width),
        "--resolution",
        str(args.resolution),
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--pairs",
        str(args.pairs),
        "--beta",
        str(args.beta),
        "--root",
        str(root),
    ]
    modes = [["--run", "baseline"], ["--run", "diffalign", "--optimizer", "adamw"]]
    if args.ft == "full":
        modes.append(["--run", "diffalign", "--optimizer", "adafactor"])
    if args.ablations:
        modes += [["--run", "diffalign", "--optimizer", "adamw", "--ablation", a] for a in ABLATIONS]
    results = []
    for m in modes:
        p = subprocess.run(
            [sys.executable, "-m", "diffalign.benchmarks.perf.dpo_bench", *common, *m],
            capture_output=True,
            text=True,
        )
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode or not line:
            raise RuntimeError(f"mode {m} failed:\n{p.stderr[-3000:]}")
        results.append(json.loads(line[0][7:]))
    base = results[0]
    print(
        f"SD1.5-architecture UNet at width x{args.width}, {args.resolution}px, "
        f"batch {args.batch} pairs, {args.ft}, "
        f"{args.steps} steps, {torch.get_num_threads()} threads; cache build {cache_s:.1f} s (once)"
    )
    for r in results:
        extra = (
            f" (end to end incl. loading + pre-pass {r['pairs_per_s_incl_prepass']:.3f})"
            if "pairs_per_s_incl_prepass" in r
            else ""
        )
        print(
            f"  {r['mode']:<22} {r['pairs_per_s']:.3f} pairs/s{extra}  peak RSS {r['peak_rss_gb']:.2f} GB  "
            f"speed x{r['pairs_per_s'] / base['pairs_per_s']:.2f}  "
            f"memory x{r['peak_rss_gb'] / base['peak_rss_gb']:.2f}"
        )
    (root / f"results-{args.ft}.json").write_text(
        json.dumps({"cache_s": cache_s, "results": results}, indent=2)
    )
    return results


if __name__ == "__main__":
    main()
