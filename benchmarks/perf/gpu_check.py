"""Real-size DPO step on one GPU: SDXL UNet and SD3-medium transformer (random weights, bf16).

    bash benchmarks/perf/gpu_check.sh            # about 10 minutes on one H200

For each model: the baseline step (policy forward/backward on the fused winner+loser batch plus a
separate reference forward with LoRA toggled off under no_grad) vs diffalign's (reference errors
precomputed: no reference forward in the step), SDPA vs xformers when installed; LoRA rank 8 on
the attention projections; then full fine-tuning memory: frozen reference copy + AdamW vs no
reference + Adafactor. Prints steps/s, pairs/s and peak ``torch.cuda.max_memory_allocated``;
paste the table into ``benchmarks/RESULTS.md`` with the date and device.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def sdxl_unet():
    from diffusers import UNet2DConditionModel

    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2048,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def sd3_transformer():
    from diffusers import SD3Transformer2DModel

    # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
    return SD3Transformer2DModel(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=192,
    )


def inputs(kind: str, pairs: int, res: int, device: str):
    n = 2 * pairs
    if kind == "sdxl":
        x = torch.randn(n, 4, res // 8, res // 8, device=device, dtype=torch.bfloat16)
        kw = {
            "encoder_hidden_states": torch.randn(n, 77, 2048, device=device, dtype=torch.bfloat16),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(n, 1280, device=device, dtype=torch.bfloat16),
                "time_ids": torch.tensor(
                    [[res, res, 0, 0, res, res]] * n, device=device, dtype=torch.bfloat16
                ),
            },
        }
    else:
        x = torch.randn(n, 16, res // 8, res // 8, device=device, dtype=torch.bfloat16)
        kw = {
            "encoder_hidden_states": torch.randn(n, 333, 4096, device=device, dtype=torch.bfloat16),
            "pooled_projections": torch.randn(n, 2048, device=device, dtype=torch.bfloat16),
        }
    return x, kw


def forward(model, kind, x, t, kw):
    out = model(x, t, **kw) if kind == "sdxl" else model(hidden_states=x, timestep=t, **kw)
    return out.sample


def dpo_step(model, kind, x, kw, ref_model=None, precomputed=None, lora=True):
    import torch.nn.functional as F

    t = torch.randint(0, 1000, (x.shape[0] // 2,), device=x.device).repeat_interleave(2)
    target = torch.randn_like(x)
    err = (forward(model, kind, x, t, kw).float() - target.float()).pow(2).mean(dim=[1, 2, 3]).view(-1, 2)
    if precomputed is not None:
        rerr = precomputed
    else:
        with torch.no_grad():
            if lora:
                model.disable_adapters()
                ref = forward(model, kind, x, t, kw)
                model.enable_adapters()
            else:
                ref = forward(ref_model, kind, x, t, kw)
        rerr = (ref.float() - target.float()).pow(2).mean(dim=[1, 2, 3]).view(-1, 2)
    inside = -0.5 * 5000 * ((err[:, 0] - rerr[:, 0]) - (err[:, 1] - rerr[:, 1]))
    loss = -F.logsigmoid(inside).mean()
    loss.backward()
    return loss


def measure(kind: str, mode: str, pairs: int, res: int, steps: int, attention: str, ft: str) -> dict:
    import copy

    from peft import LoraConfig

    device = "cuda"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = (sdxl_unet() if kind == "sdxl" else sd3_transformer()).to(device)
    if attention == "xformers":
        model.enable_xformers_memory_efficient_attention()
    model.enable_gradient_checkpointing()
    ref_model = None
    if ft == "lora":
        model.to(torch.bfloat16).requires_grad_(False)
        model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-5)
    else:
        if mode == "baseline":
            ref_model = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(False)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        else:
            from transformers.optimization import Adafactor

            opt = Adafactor(model.parameters(), lr=1e-5, scale_parameter=False, relative_step=False)
    x, kw = inputs(kind, pairs, res, device)
    pre = torch.rand(pairs, 2, device=device) if mode == "diffalign" else None
    for i in range(steps + 2):  # 2 warm-up steps
        if i == 2:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            dpo_step(model, kind, x, kw, ref_model, pre, lora=ft == "lora")
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    res_ = {
        "model": kind,
        "mode": mode,
        "ft": ft,
        "attention": attention,
        "pairs": pairs,
        "res": res,
        "steps_per_s": steps / dt,
        "pairs_per_s": steps * pairs / dt,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
    }
    del model, ref_model, opt
    return res_


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    import importlib.util

    attns = ["sdpa"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for kind, res in (("sdxl", 1024), ("sd3", 1024)):
        for attention in attns:
            for mode in ("baseline", "diffalign"):
                r = measure(kind, mode, args.pairs, res, args.steps, attention, "lora")
                rows.append(r)
                print(json.dumps(r), flush=True)
        for mode in ("baseline", "diffalign"):
            r = measure(kind, mode, 1, res, args.steps, "sdpa", "full")
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\n| model | FT | attention | mode | pairs/s | peak GB |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} {r['res']}px | {r['ft']} | {r['attention']} | {r['mode']} "
            f"| {r['pairs_per_s']:.2f} | {r['peak_gb']:.1f} |"
        )


if __name__ == "__main__":
    main()
