"""Real-size alignment steps on one GPU, through diffalign's own training loop.

    bash benchmarks/perf/gpu_check.sh                                  # one H200: <= 10 minutes
    python -m diffalign.benchmarks.perf.gpu_check --tiny --device cpu  # the dry run tests/ runs

Every mode is one ``diffalign.train.train(cfg)`` call on a pipeline folder built here and loaded by
the loop with ``from_pretrained`` (the GPU machine has no hub access): the real SDXL UNet, SD3.5-M
transformer and FLUX.1-dev transformer from their hub configs (random weights, bf16 on disk; the
parameter counts are checked in tests/test_gpu_check.py) with thin text encoders and a tiny VAE of
the right widths and latent channels, which the step barely touches (the text widths, T5 lengths
and latent sizes the denoiser sees are the real ones). Modes (``--list``): Diffusion-DPO with LoRA
rank 8 and full fine-tuning, SDPA vs xformers, gradient checkpointing on/off, live reference
(LoRA-off or a frozen bf16 copy) vs ``train.precompute_reference``, and one online Flow-GRPO step on
SD3.5-M; all ``train.mixed_precision=bf16``. Opt-in (not in the default set, which the budget
already cuts short; ``--modes`` or ``MODES=`` names them): the same SDXL LoRA DPO step under DeepSpeed
ZeRO-2 and ZeRO-3 (``sdxl-lora-zero2``, ``sdxl-lora-zero3``; see "DeepSpeed" below).

What is measured, per mode, after ``--warmup`` steps:

- pairs/s: pairs per step over the median wall-clock step, timed between the ends of consecutive
  optimizer updates (right after ``optimizer.step()``, after a device synchronize). Flow-GRPO rows
  count rollout images (prompts x group size) instead. The loop's own ``time/step_s`` from
  timing.jsonl is shown beside it (data or rollout, forward, backward and the optimizer step, after
  a device synchronize, measured inside the step).
- peak GiB: ``torch.cuda.max_memory_allocated`` during the timed steps; "peak all" over the whole
  ``train()`` call, loading (the loop moves the denoiser to the GPU in fp32 before LoRA's bf16 cast)
  and the reference pre-pass (1.5x the fp32 denoiser) included.
- TFLOP/step and MFU: every denoiser call of the timed steps is recorded (a forward pre-hook), and
  one forward of each distinct input shape is counted with ``FlopCounterMode`` on a meta-device copy
  of the same config (no memory, any attention backend). Calls with gradients count 3 forwards for
  full fine-tuning and 2 for LoRA (a frozen base needs input gradients, not weight gradients), calls
  without (reference, rollout sampling) 1; gradient-checkpointing recomputation is not counted
  (model FLOPs, not hardware FLOPs). MFU divides by ``--peak-tflops`` (989: H100/H200 SXM dense bf16).

Nothing of diffalign is replaced: the run is watched through torch's public hooks (a global forward
pre-hook finds the denoiser, whose own hook then records its calls; a global optimizer-step hook marks
each update; ``instrumented``). The final checkpoint is not written by default: the run asks for one
step more than it times and is stopped by an exception at that step's first denoiser call, before
the checkpoint a finished run writes (a 12 B full fine-tuning checkpoint holds ~100 GB, more than the
GPU machine's disk, and writing it is not the step being measured). ``--final-checkpoint`` lets every
run finish and write it, and times it (the "final save s" column: from the last update to the end of
``train()``, export included; each is deleted after its row). The data path is the loop's default:
``data.cache_dir=auto`` builds the latent cache during start-up (kept under ``--work``), and the
timed steps read it.

Memory while loading: ``diffalign.models.loading.load_adapter`` loads every pipeline in fp32 on the
host (FLUX.1-dev: 48 GB of host memory during ``from_pretrained``); a LoRA run under bf16 moves its
frozen denoiser to the GPU already cast to bf16 (``denoiser_dtype``, tensor by tensor), so no fp32
copy of it sits on the GPU; full fine-tuning keeps fp32 master weights there.

DeepSpeed (GPU only: accelerate runs it only on GPUs, and diffalign refuses it without CUDA). A
DeepSpeed mode's worker is started by ``accelerate launch --config_file
configs/accelerate/deepspeed_zero<N>.yaml --num_processes 1`` (the shipped configs, one process on
the one GPU), so ``train()`` runs under the engine a user's launch gets; ``train.grad_accum=1`` as
diffalign requires there. The row's "engine" column is what the run started: the engine named by
diffalign's start-up line (``engine: deepspeed (...)``) and the ZeRO stage of the ``DeepSpeedEngine``
that ran the forward; a DeepSpeed mode whose run started anything else, or another stage, fails. The
optimizer is diffalign's torch AdamW handed through ``accelerator.prepare`` (no ``optimizer`` in the
DeepSpeed config): DeepSpeed wraps it in its ZeRO optimizer and builds none of its CUDA ops (no
FusedAdam, no offload), so nothing is JIT-compiled on the GPU machine. Updates are marked by the same
optimizer-step hook (DeepSpeed steps the wrapped AdamW once per update inside ``backward()``: one
parameter group, and under ZeRO-3 one sub-group for a LoRA's parameters). Without an importable
``deepspeed`` (``gpu_check.sh --fetch-wheels`` carries it) or on ``--device cpu`` these rows are
``skipped`` with the reason. Each costs about ``DEEPSPEED_EXTRA_S`` more than a plain SDXL mode (the
launcher, a second interpreter, the engine's start).

Each mode runs in a worker process; a mode that fails (out of memory, xformers missing, a crash, an
update the guard skipped) becomes a ``failed`` row with the one-line reason and the rest go on, and
modes that would overrun ``--budget-s`` are ``skipped``, so the table is always printed; rerun those
with ``--modes``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 tensor-core peak of an H100/H200 SXM (datasheet); about 790 is what a large bf16
matmul reaches on the lent H200 (``/work/.library/device/KINDS.md``)."""
GRACE_S = 20.0  # after the budget: the worker is killed, the table still printed


@dataclass(frozen=True)
class Family:
    label: str
    tiny: str  # diffalign.models.tiny builder name (the --tiny dry run)
    resolution: int  # px of the real-size run (the tiny one uses TINY_RESOLUTION)
    pairs: int  # pairs per step of the real-size run (the tiny one uses 1)
    max_sequence_length: int  # T5 tokens (the hub pipelines' defaults; 0: no T5)
    est_s: float  # a mode's wall time on an H200 (load + steps), for the budget
    build_s: float  # building and saving the pipeline folder on an H200


FAMILIES = {
    "sdxl": Family("SDXL UNet 2.6B", "sdxl", 1024, 4, 0, 35, 25),
    "sd35m": Family("SD3.5-M 2.2B", "sd35", 1024, 4, 256, 35, 25),
    "flux": Family("FLUX.1-dev 11.9B", "flux", 1024, 1, 512, 75, 80),
}
TINY_RESOLUTION = 32


@dataclass(frozen=True)
class Mode:
    family: str
    lora: bool = True  # rank 8 on to_q/to_k/to_v/to_out.0; False: full fine-tuning
    attention: str = "sdpa"
    checkpointing: bool = True
    precompute: bool = False  # train.precompute_reference
    optimizer: str = "adamw"
    online: bool = False  # one Flow-GRPO step (rollout + update) instead of Diffusion-DPO
    zero: int = 0  # DeepSpeed ZeRO stage (configs/accelerate/deepspeed_zero<N>.yaml); 0: no DeepSpeed


# Ordered: a family's modes run back to back on one saved folder; the 12 B full fine-tuning last
MODES: dict[str, Mode] = {
    "sdxl-lora": Mode("sdxl"),
    "sdxl-lora-xformers": Mode("sdxl", attention="xformers"),
    "sdxl-lora-nockpt": Mode("sdxl", checkpointing=False),
    "sdxl-lora-preref": Mode("sdxl", precompute=True),
    "sdxl-full": Mode("sdxl", lora=False),
    "sdxl-full-preref": Mode("sdxl", lora=False, precompute=True, optimizer="adafactor"),
    "sdxl-lora-zero2": Mode("sdxl", zero=2),  # opt-in (not in DEFAULT_MODES)
    "sdxl-lora-zero3": Mode("sdxl", zero=3),  # opt-in
    "sd35m-lora": Mode("sd35m"),
    "sd35m-lora-xformers": Mode("sd35m", attention="xformers"),
    "sd35m-lora-nockpt": Mode("sd35m", checkpointing=False),
    "sd35m-lora-preref": Mode("sd35m", precompute=True),
    "sd35m-full-preref": Mode("sd35m", lora=False, precompute=True, optimizer="adafactor"),
    "sd35m-grpo": Mode("sd35m", online=True),
    "flux-lora": Mode("flux"),
    "flux-lora-preref": Mode("flux", precompute=True),
    "flux-full-preref": Mode("flux", lora=False, precompute=True, optimizer="adafactor"),
}
DEFAULT_MODES = [n for n, m in MODES.items() if not m.zero]
"""What runs without ``--modes``. By the estimates below (est_s, build_s, GRPO_EST_S) these already
need ~800 s against the ~520 s gpu_check.sh leaves after installing, so the budget skips the last
(FLUX) ones; the DeepSpeed modes (~65 s each) are named explicitly, e.g.
``MODES=sdxl-lora,sdxl-lora-zero2,sdxl-lora-zero3`` (~190 s with the SDXL build)."""
DEEPSPEED_EXTRA_S = 30.0  # a DeepSpeed mode over a plain one: accelerate launch + torchrun + engine start
REPO = Path(__file__).resolve().parents[2]  # through gpu_check.sh's package links too (resolved)

GRPO = {
    "real": {"group_size": 8, "sample_steps": 10, "resolution": 512},
    "tiny": {"group_size": 2, "sample_steps": 3},
}
GRPO_EST_S = 60.0

# Hub denoiser configs (the keys that differ from the diffusers defaults). SDXL:
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json; SD3.5-M and FLUX.1-dev as in
# tests/test_families_meta.py and shared/reference/model-families.md §2-§3 (counted 2.24 B / 11.90 B)
REAL_DENOISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sdxl": (
        "UNet2DConditionModel",
        {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 2048,
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    ),
    "sd35m": (
        "SD3Transformer2DModel",
        {
            "sample_size": 128,
            "patch_size": 2,
            "in_channels": 16,
            "out_channels": 16,
            "attention_head_dim": 64,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 2048,
            "num_layers": 24,
            "num_attention_heads": 24,
            "caption_projection_dim": 1536,
            "pos_embed_max_size": 384,
            "qk_norm": "rms_norm",
            "dual_attention_layers": tuple(range(13)),
        },
    ),
    "flux": ("FluxTransformer2DModel", {"guidance_embeds": True}),
}


# ----------------------------------------------------------------------------- pipeline folders


def build_pipeline(family: str, folder: Path, tiny: bool, device: str) -> None:
    """Save a pipeline folder for ``family``: the tiny test pipeline, or the real-size denoiser with
    thin text encoders and a tiny VAE of the widths it expects."""
    from diffalign.models.tiny import build_tiny_pipeline

    if tiny:
        build_tiny_pipeline(FAMILIES[family].tiny, folder)  # type: ignore[arg-type]
    else:
        real_pipeline(family, device).save_pretrained(str(folder), safe_serialization=True)
    (folder / "built.ok").write_text("")  # a folder without it is a half-written one


@contextmanager
def _default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def real_denoiser(family: str, device: str) -> Any:
    """Random real-size weights, initialised on ``device`` directly in bf16: 12 B fp32 on a CPU
    would take minutes and 48 GB; the loop loads them as fp32 anyway (``load_adapter``)."""
    import diffusers
    import torch

    cls, config = REAL_DENOISERS[family]
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(torch.bfloat16):
        model = getattr(diffusers, cls)(**config)
    return model.to("cpu")


def real_pipeline(family: str, device: str) -> Any:
    import diffusers
    from transformers import T5Config, T5EncoderModel

    from diffalign.models.tiny import WORDS, _clip_text
    from diffalign.models.tiny import _vae as vae4
    from diffalign.models.tiny_dit import _vae as vae16
    from diffalign.models.tokenizer import build_clip_tokenizer, build_t5_tokenizer

    def clip(hidden: int, projection: int | None) -> Any:  # 2 layers, the real width
        tok = build_clip_tokenizer(WORDS)
        return _clip_text(hidden, projection, len(tok), tok.eos_token_id, tok.bos_token_id)

    den = real_denoiser(family, device)
    if family == "sdxl":  # CLIP-L 768 + bigG 1280 hidden states, bigG's 1280 pooled projection
        sched = diffusers.EulerDiscreteScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            timestep_spacing="leading",
            steps_offset=1,
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=vae4(),
            text_encoder=clip(768, None),
            text_encoder_2=clip(1280, 1280),
            tokenizer=build_clip_tokenizer(WORDS),
            tokenizer_2=build_clip_tokenizer(WORDS),
            unet=den,
            scheduler=sched,
        )
    if family == "sd35m":  # no T5: the pipeline feeds 256 zero tokens of width 4096 (the real shape)
        return diffusers.StableDiffusion3Pipeline(
            transformer=den,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=vae16(16, 1.5305, 0.0609),
            text_encoder=clip(768, 768),
            tokenizer=build_clip_tokenizer(WORDS),
            text_encoder_2=clip(1280, 1280),
            tokenizer_2=build_clip_tokenizer(WORDS),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    # FLUX needs its T5 (512 tokens of width 4096): one thin layer
    t5_tok = build_t5_tokenizer(WORDS, model_max_length=512)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=4096,
            d_kv=64,
            d_ff=256,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    sched = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return diffusers.FluxPipeline(
        scheduler=sched,
        vae=vae16(16, 0.3611, 0.1159),
        text_encoder=clip(768, None),
        tokenizer=build_clip_tokenizer(WORDS),
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=den,
    )


def build_reward_clip(folder: Path) -> Path:
    """A tiny random CLIPModel folder for Flow-GRPO's reward (``clip_score=``): the rollout needs a
    reward, which is not what is measured."""
    from transformers import CLIPConfig, CLIPModel

    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(WORDS)
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {
        **layer,
        "vocab_size": len(tok),
        "max_position_embeddings": 77,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.eos_token_id,
    }
    cfg = CLIPConfig(
        text_config=text, vision_config={**layer, "image_size": 32, "patch_size": 8}, projection_dim=16
    )
    CLIPModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    pre = {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 32},
        "crop_size": {"height": 32, "width": 32},
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


PROMPTS = ["a red circle", "a blue square above a green triangle", "a photo of a dog", "a yellow cat"]


def write_data(work: Path, pairs: int) -> tuple[Path, Path]:
    """A Pick-a-Pic style parquet of ``pairs`` pairs (64 px ShapesWorld renders; the loop resizes
    them) and a prompts file for the rollouts; words the thin tokenizers know."""
    from diffalign.benchmarks.perf.data import write_pairs

    parquet = work / "data" / f"pairs-{pairs}.parquet"
    if not parquet.exists():
        write_pairs(parquet, pairs, 64)
    prompts = work / "data" / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return parquet, prompts


# ----------------------------------------------------------------------------- measuring train()


def _spec(x: Any) -> Any:
    """A shape-only description of a denoiser argument (tensors -> shape and dtype)."""
    import torch

    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), str(x.dtype))
    if isinstance(x, dict):
        return {k: _spec(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_spec(v) for v in x)
    return x


def _meta(x: Any) -> Any:
    """The inverse of ``_spec`` on the meta device (floating tensors as fp32, like the meta model)."""
    import torch

    if isinstance(x, tuple) and len(x) == 3 and x[0] == "tensor":
        dtype = getattr(torch, x[2].removeprefix("torch."))
        return torch.zeros(x[1], dtype=torch.float32 if dtype.is_floating_point else dtype, device="meta")
    if isinstance(x, dict):
        return {k: _meta(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return type(x)(_meta(v) for v in x)
    return x


class StopTimedRun(Exception):
    """Raised by the first denoiser call after the last timed update: ``train()`` ends there, before
    the final checkpoint it would write (unless ``--final-checkpoint``)."""


class Recorder:
    """What one ``train()`` call did: denoiser calls (time, input shapes, with gradients?) and
    the end of every optimizer update. ``stop_after``: the number of updates after which the next
    denoiser call raises ``StopTimedRun`` (None: let the run end by itself)."""

    def __init__(self, device: str, warmup: int, stop_after: int | None = None) -> None:
        self.device, self.warmup, self.stop_after = device, warmup, stop_after
        self.setup_peak = 0  # CUDA bytes allocated at most before the timed steps (loading, pre-pass)
        self.model: tuple[type, dict[str, Any]] | None = None
        self.inputs: dict[str, tuple[Any, Any]] = {}  # signature -> (args spec, kwargs spec)
        self.calls: list[tuple[float, str, bool]] = []
        self.step_ends: list[float] = []
        self.on_warm: list[Any] = []  # called once when the warm-up updates are done
        self.zero_stage: int | None = None  # the ZeRO stage of a DeepSpeedEngine that ran a forward

    def watch(self, denoiser: Any) -> None:
        """Record every later call of this denoiser (the policy, or a frozen copy of it)."""
        if self.model is None:
            self.model = (type(denoiser), dict(denoiser.config))

        # a plain function, not a bound method: a frozen reference copied from a watched denoiser
        # (deepcopy) keeps reporting here (deepcopy would copy a bound method's Recorder along)
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            self._record(args, kwargs)

        denoiser.register_forward_pre_hook(hook, with_kwargs=True)
        denoiser._gpu_check_watched = True  # copied along by deepcopy, like the hook

    def _record(self, args: tuple, kwargs: dict) -> None:
        import torch

        if self.stop_after is not None and len(self.step_ends) >= self.stop_after:
            raise StopTimedRun
        spec = (_spec(args), _spec(kwargs))
        key = repr(spec)
        self.inputs.setdefault(key, spec)
        self.calls.append((time.perf_counter(), key, torch.is_grad_enabled()))

    def step_end(self) -> None:
        import torch

        if self.device == "cuda":  # the step's kernels are done (the guard's finiteness check syncs next)
            torch.cuda.synchronize()
        self.step_ends.append(time.perf_counter())
        if len(self.step_ends) == self.warmup:
            if self.device == "cuda":
                # the timed steps' own peak, apart from loading (fp32 on the GPU before LoRA's bf16
                # cast) and the reference pre-pass (1.5x the fp32 denoiser)
                self.setup_peak = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            for fn in self.on_warm:
                fn()


def denoiser_class(folder: Path) -> str:
    """The class name of a pipeline folder's denoiser (``unet`` or ``transformer`` in model_index.json)."""
    index = json.loads((folder / "model_index.json").read_text())
    entry = index.get("transformer") or index.get("unet")
    if not entry or entry[1] is None:
        raise ValueError(f"{folder}: model_index.json names no unet or transformer")
    return str(entry[1])


@contextmanager
def instrumented(rec: Recorder, denoiser: str) -> Iterator[None]:
    """Watch one ``train()`` call through torch's public hooks; nothing of diffalign is replaced.

    - A global forward pre-hook finds each module of class ``denoiser`` (the loaded policy; a frozen
      copy is found as a copy of a watched one) at its first call and gives it a hook recording every
      later call with its inputs; the global hook is removed when the warm-up updates are done, so
      the timed steps run without it (it puts every module call on torch's slower hook path).
      The same hook notes the ZeRO stage of a ``DeepSpeedEngine`` that runs a forward (the model
      ``accelerator.prepare`` returns under DeepSpeed).
    - A global optimizer-step post-hook marks the end of each update (an update the bad-step guard
      skips is not counted, and ``measure`` then fails the row).
    - With ``rec.stop_after``, the first denoiser call after that many updates raises
      ``StopTimedRun``: the run asks for one step more than it times and stops inside it, before the
      final checkpoint and export (``run_mode`` catches it)."""
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    def find(module: Any, args: tuple) -> None:
        name = type(module).__name__
        if name == denoiser and not getattr(module, "_gpu_check_watched", False):
            rec.watch(module)  # from its next call on (this one's keyword inputs are not visible here)
        elif name == "DeepSpeedEngine" and rec.zero_stage is None:
            rec.zero_stage = int(module.zero_optimization_stage())

    def updated(optimizer: Any, args: tuple, kwargs: dict) -> None:
        rec.step_end()

    finder = register_module_forward_pre_hook(find)
    stepper = register_optimizer_step_post_hook(updated)
    rec.on_warm.append(finder.remove)
    try:
        yield
    finally:
        finder.remove()
        stepper.remove()


_FLOPS_CACHE: dict[tuple[str, str], int] = {}


def forward_flops(model: tuple[type, dict[str, Any]], inputs: dict[str, tuple[Any, Any]]) -> dict[str, int]:
    """FLOPs of one forward per input signature, on a meta-device model of the same config."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    cls, config = model
    ckey = repr(sorted(config.items()))
    todo = [k for k in inputs if (ckey, k) not in _FLOPS_CACHE]
    if todo:
        with torch.device("meta"):
            meta = cls.from_config(config).float().eval()
        for key in todo:
            args, kwargs = _meta(inputs[key][0]), _meta(inputs[key][1])
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                meta(*args, **kwargs)
            _FLOPS_CACHE[(ckey, key)] = counter.get_total_flops()
    return {k: _FLOPS_CACHE[(ckey, k)] for k in inputs}


def measure(rec: Recorder, warmup: int, steps: int, lora: bool) -> dict[str, float]:
    """Median step time and model FLOPs per step over the ``steps`` updates after ``warmup``."""
    if len(rec.step_ends) < warmup + steps:  # the guard skipped a non-finite one (train/bad_steps)
        raise RuntimeError(
            f"{len(rec.step_ends)} of {warmup + steps} optimizer updates ran (a skipped one is not timed)"
        )
    ends = rec.step_ends[warmup - 1 : warmup + steps]
    durations = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    assert rec.model is not None
    per_call = forward_flops(rec.model, rec.inputs)
    factor = 2 if lora else 3
    flops = sum(per_call[k] * (factor if grad else 1) for t, k, grad in rec.calls if ends[0] < t <= ends[-1])
    window = ends[-1] - ends[0]
    return {
        "step_s": statistics.median(durations),
        "flops_per_step": flops / len(durations),
        "flop_rate": flops / window,
    }


def loop_step_s(run_dir: Path, warmup: int) -> float | None:
    """The loop's own ``time/step_s`` (timing.jsonl), median over the timed steps."""
    f = run_dir / "timing.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    vals = [r["time/step_s"] for r in rows if r["step"] > warmup and "time/step_s" in r]
    return statistics.median(vals) if vals else None


# ----------------------------------------------------------------------------- one mode


@dataclass
class Row:
    mode: str
    model: str
    ft: str
    attention: str
    checkpointing: bool
    reference: str
    batch: str
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    engine: str = ""  # what the run started: diffalign's start-up line's engine (+ the ZeRO stage)
    per_s: float | None = None  # pairs/s (Flow-GRPO: rollout images/s)
    step_s: float | None = None
    loop_step_s: float | None = None
    peak_gib: float | None = None  # during the timed steps
    peak_all_gib: float | None = None  # the whole train() call
    tflop_per_step: float | None = None
    mfu: float | None = None
    total_s: float | None = None
    checkpoint_s: float | None = None  # --final-checkpoint: from the last update to train()'s return


def describe(name: str, tiny: bool, pairs: int | None) -> Row:
    m = MODES[name]
    fam = FAMILIES[m.family]
    if m.online:
        reference, batch = "LoRA-off (KL)", _grpo_batch(tiny)
    else:
        reference = "precomputed" if m.precompute else ("LoRA-off" if m.lora else "frozen copy")
        res = TINY_RESOLUTION if tiny else fam.resolution
        batch = f"{_pairs(m.family, tiny, pairs)} pairs @{res}px"
    return Row(
        mode=name,
        model=("tiny " + fam.tiny) if tiny else fam.label,
        ft=f"{'Flow-GRPO ' if m.online else ''}{'LoRA r8' if m.lora else 'full, ' + m.optimizer}",
        attention=m.attention,
        checkpointing=m.checkpointing,
        reference=reference,
        batch=batch,
    )


def _pairs(family: str, tiny: bool, override: int | None) -> int:
    return override or (1 if tiny else FAMILIES[family].pairs)


def _grpo_batch(tiny: bool) -> str:
    g = GRPO["tiny" if tiny else "real"]
    res = TINY_RESOLUTION if tiny else GRPO["real"]["resolution"]
    return f"1 prompt x {g['group_size']}, {g['sample_steps']} steps @{res}px"


def launch_config(name: str) -> Path | None:
    """The accelerate config a DeepSpeed mode's worker is launched with (None: a plain process)."""
    zero = MODES[name].zero
    return REPO / "configs" / "accelerate" / f"deepspeed_zero{zero}.yaml" if zero else None


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def deepspeed_skip_reason(name: str, args: Any) -> str | None:
    """Why a DeepSpeed mode cannot run here (None: it can, or it is no DeepSpeed mode). Decided in
    the parent, before anything is launched: ``accelerate launch`` itself fails without deepspeed."""
    config = launch_config(name)
    if config is None:
        return None
    if not _has_deepspeed():
        return "deepspeed is not installed (gpu_check.sh --fetch-wheels builds its wheel into .whl/)"
    if args.device != "cuda":
        return "DeepSpeed needs CUDA: accelerate runs it on GPUs only and diffalign refuses it on CPUs"
    if not config.is_file():
        return f"no launch config {config}"
    return None


def mode_need_s(name: str, args: Any) -> float:
    """A mode's estimated wall time (the budget check), its family's folder build included when the
    folder is not there yet."""
    m = MODES[name]
    if args.tiny:
        return 5.0
    need = GRPO_EST_S if m.online else FAMILIES[m.family].est_s
    need += DEEPSPEED_EXTRA_S if m.zero else 0.0
    if not (args.work / "models" / m.family / "built.ok").is_file():
        need += FAMILIES[m.family].build_s
    return need


def max_steps(args: Any) -> int:
    """The run's ``train.max_steps``: the warm-up and timed updates, and without
    ``--final-checkpoint`` one more, inside which it is stopped before its final checkpoint."""
    return args.warmup + args.steps + (0 if args.final_checkpoint else 1)


def overrides(name: str, folder: Path, data: tuple[Path, Path], run_dir: Path, args: Any) -> list[str]:
    m = MODES[name]
    fam = FAMILIES[m.family]
    common = [
        f"model.path={folder}",
        f"train.output_dir={run_dir}",
        f"train.max_steps={max_steps(args)}",
        "train.mixed_precision=bf16",
        f"train.attention={m.attention}",
        f"train.gradient_checkpointing={str(m.checkpointing).lower()}",
        f"lora.rank={8 if m.lora else 0}",
        "train.report_to=none",
        "train.checkpoint_every=1000000",  # no checkpoint but the final one (see max_steps)
        "train.lr=1e-5",
    ]
    if m.zero:  # DeepSpeed steps inside backward(): diffalign refuses accumulation there
        common.append("train.grad_accum=1")
    if fam.max_sequence_length and not args.tiny:  # the tiny folders set their own (diffalign.json)
        common.append(f"model.max_sequence_length={fam.max_sequence_length}")
    if m.online:
        g = GRPO["tiny" if args.tiny else "real"]
        return common + [
            "objective.name=flow_grpo",
            f"objective.rewards=clip_score={args.work / 'reward-clip'}",
            f"objective.group_size={g['group_size']}",
            f"objective.sample_steps={g['sample_steps']}",
            f"data.path={data[1]}",
            f"data.resolution={TINY_RESOLUTION if args.tiny else GRPO['real']['resolution']}",
            "train.batch_size=1",
        ]
    return common + [
        "objective.name=diffusion_dpo",
        f"data.path={data[0]}",
        f"data.resolution={TINY_RESOLUTION if args.tiny else fam.resolution}",
        f"train.batch_size={_pairs(m.family, args.tiny, args.pairs)}",
        f"train.precompute_reference={str(m.precompute).lower()}",
        f"train.optimizer={m.optimizer}",
    ]


class EngineLine(io.TextIOBase):
    """``sys.stdout`` during one ``train()`` call: everything passes through, and the start-up line
    naming the engine (``engine: deepspeed (1 processes on cuda)``) is kept."""

    def __init__(self, out: Any) -> None:
        self.out, self.line, self._part = out, None, ""

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for ln in lines:
            if self.line is None and ln.startswith("engine: "):
                self.line = ln.removeprefix("engine: ").strip()
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def fileno(self) -> int:
        return self.out.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.out, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:  # anything else a library asks of sys.stdout
        return getattr(self.out, name)


def engine_started(line: str | None, zero_stage: int | None) -> str:
    """The row's engine cell: the start-up line's engine name and, when a DeepSpeedEngine ran, its stage."""
    name = line.split(" ", 1)[0] if line else "?"
    return name + (f" ZeRO-{zero_stage}" if zero_stage is not None else "")


def jit_built_ops() -> str:
    """Torch extensions compiled at run time (DeepSpeed builds its CUDA ops that way), as a note for
    the engine cell: the workers point ``TORCH_EXTENSIONS_DIR`` into ``--work``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    built = sorted(d.name for d in Path(root).iterdir() if d.is_dir()) if root and Path(root).is_dir() else []
    return f" (JIT-built: {', '.join(built)})" if built else ""


def check_engine(name: str, line: str | None, zero_stage: int | None) -> None:
    """A DeepSpeed mode must have started DeepSpeed at its config's stage (never a silent fallback)."""
    zero = MODES[name].zero
    if not zero:
        return
    if not line or not line.startswith("deepspeed"):
        raise RuntimeError(f"launched with deepspeed_zero{zero}.yaml, but diffalign started engine: {line}")
    if zero_stage != zero:
        raise RuntimeError(
            f"launched with deepspeed_zero{zero}.yaml, but DeepSpeed ran ZeRO stage {zero_stage}"
        )


def run_mode(name: str, folder: Path, args: Any, row: Row | None = None) -> Row:
    """One ``train()`` call and what it measured (into ``row``, which keeps the engine the run
    started when it then fails)."""
    import torch

    from diffalign.config import load_config
    from diffalign.train import train

    m = MODES[name]
    row = row or describe(name, args.tiny, args.pairs)
    run_dir = args.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resume or a config clash
    pairs = _pairs(m.family, args.tiny, args.pairs)
    data = write_data(args.work, pairs * max_steps(args))
    if m.online and not (args.work / "reward-clip" / "config.json").is_file():
        build_reward_clip(args.work / "reward-clip")
    cfg = load_config(None, overrides(name, folder, data, run_dir, args))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rec = Recorder(args.device, args.warmup, None if args.final_checkpoint else args.warmup + args.steps)
    watch = EngineLine(sys.stdout)
    t0 = time.perf_counter()
    try:
        with instrumented(rec, denoiser_class(folder)), redirect_stdout(watch):
            train(cfg)
    except StopTimedRun:  # the extra step's first denoiser call: no final checkpoint
        pass
    else:
        if not args.final_checkpoint:
            raise RuntimeError("the run ended without reaching its extra step (see train/bad_steps)")
        _check_export(run_dir, m.lora)
        row.checkpoint_s = time.perf_counter() - rec.step_ends[-1]
    finally:
        row.engine = engine_started(watch.line, rec.zero_stage) + jit_built_ops()
    check_engine(name, watch.line, rec.zero_stage)
    row.total_s = time.perf_counter() - t0
    got = measure(rec, args.warmup, args.steps, m.lora)
    items = GRPO["tiny" if args.tiny else "real"]["group_size"] if m.online else pairs
    row.step_s, row.per_s = got["step_s"], items / got["step_s"]
    row.tflop_per_step = got["flops_per_step"] / 1e12
    row.loop_step_s = loop_step_s(run_dir, args.warmup)
    if cuda:
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.peak_all_gib = max(row.peak_gib, rec.setup_peak / 2**30)
    if args.peak_tflops:
        row.mfu = got["flop_rate"] / (args.peak_tflops * 1e12)
    return row


def _check_export(run_dir: Path, lora: bool) -> None:
    """The final checkpoint exists with its export (what ``--final-checkpoint`` promises to time)."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        raise RuntimeError(f"--final-checkpoint: {run_dir} has no checkpoint")
    export = run_dir / "checkpoints" / latest.read_text().strip() / "export"
    files = list(export.rglob("*.safetensors"))
    if not files:
        raise RuntimeError(f"--final-checkpoint: {export} holds no {'LoRA' if lora else 'model'} weights")
    from safetensors import safe_open

    for f in files:  # a parameter saved while partitioned (ZeRO-3 holds it elsewhere) is empty
        with safe_open(str(f), "pt") as st:
            empty = [k for k in st.keys() if 0 in st.get_slice(k).get_shape()]
        if empty:
            raise RuntimeError(f"--final-checkpoint: {f.name} holds {len(empty)} empty tensors ({empty[0]})")


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


# ----------------------------------------------------------------------------- worker process


def _emit(results: Path, record: dict[str, Any]) -> None:
    with results.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def ensure_folder(family: str, args: Any) -> Path:
    folder = args.work / "models" / family
    if not (folder / "built.ok").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        build_pipeline(family, folder, args.tiny, args.device)
        print(f"[gpu_check] built the {family} folder in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker(args: Any) -> None:
    """Run ``args.modes`` in order in this process, one JSON line per mode start and result."""
    from diffalign._quiet import quiet_libraries

    quiet_libraries()
    results: Path = args.results
    _emit(results, {"env": _environment(args.device)})
    for i, name in enumerate(args.modes):
        m = MODES[name]
        _emit(results, {"start": name})
        if os.environ.get("DIFFALIGN_GPU_CHECK_CRASH") == name:  # testing aid: a mode that kills its worker
            os._exit(3)
        row = describe(name, args.tiny, args.pairs)
        need = mode_need_s(name, args)
        if m.attention == "xformers" and not _has_xformers():
            row.status, row.reason = "skipped", "xformers is not installed"
        elif time.time() + need > args.deadline:
            row.status, row.reason = "skipped", f"time budget (needs ~{need:.0f} s); rerun with --modes"
        else:
            try:
                row = run_mode(name, ensure_folder(m.family, args), args, row)
            except Exception as e:  # out of memory, a backend that fails, ...: one row, then go on
                row.status, row.reason = "failed", one_line(e)
            # a written checkpoint has been timed and checked; the next mode needs the disk
            shutil.rmtree(args.work / "runs" / name / "checkpoints", ignore_errors=True)
            _free_memory()
        _emit(results, {"row": asdict(row)})
        # a later worker's modes (a DeepSpeed mode runs in a worker of its own) may need it too
        later = [MODES[n].family for n in args.modes[i + 1 :]] + args.keep_families
        if m.family not in later and not args.keep:  # its folder can go: disk is 64 GB there
            shutil.rmtree(args.work / "models" / m.family, ignore_errors=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a DeepSpeed worker's process group (torchrun)
        dist.destroy_process_group()


def _has_xformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("xformers") is not None


# ----------------------------------------------------------------------------- parent process


def _tail_reason(log: Path, returncode: int | None) -> str:
    """Why a worker died: its exit status and the last line of its log that names an error."""
    why = f"worker died (exit status {returncode})"
    if not log.is_file():
        return why
    lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines()]
    errors = [ln for ln in lines if "Error" in ln or "error:" in ln or "Killed" in ln]
    return f"{why}: {errors[-1]}"[:200] if errors else why


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launcher(name: str) -> list[str]:
    """How a worker for ``name`` starts: a DeepSpeed mode under ``accelerate launch`` with its shipped
    config (one process: the one GPU; a free port for torchrun's rendezvous), others plain."""
    config = launch_config(name)
    if config is None:
        return [sys.executable]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    return launch + ["--num_processes", "1", "--num_machines", "1", "--main_process_port", str(_free_port())]


def next_batch(pending: list[str]) -> list[str]:
    """The modes the next worker runs: a DeepSpeed mode alone (its own launch), else the plain
    modes up to the next DeepSpeed one."""
    if MODES[pending[0]].zero:
        return pending[:1]
    n = next((i for i, name in enumerate(pending) if MODES[name].zero), len(pending))
    return pending[:n]


def _worker_cmd(
    args: Any, modes: list[str], results: Path, keep_families: list[str] | None = None
) -> list[str]:
    cmd = _launcher(modes[0]) + ["-m", "diffalign.benchmarks.perf.gpu_check", "--worker"]
    cmd += ["--modes", ",".join(modes), "--results", str(results), "--deadline", str(args.deadline)]
    if keep_families:
        cmd += ["--keep-families", ",".join(sorted(set(keep_families)))]
    cmd += ["--work", str(args.work), "--device", args.device, "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup)]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.pairs:
        cmd += ["--pairs", str(args.pairs)]
    cmd += ["--final-checkpoint"] if args.final_checkpoint else []
    return cmd + (["--tiny"] if args.tiny else []) + (["--keep"] if args.keep else [])


def _read(results: Path, seen: int) -> tuple[list[dict[str, Any]], int]:
    if not results.is_file():
        return [], seen
    lines = results.read_text().split("\n")[:-1]  # complete lines only: the worker may be writing one
    return [json.loads(ln) for ln in lines[seen:] if ln.strip()], len(lines)


def run_workers(args: Any) -> list[Row]:
    """Run the modes in worker processes until each has a row; a worker that dies (or overruns
    the budget) marks its current mode failed and a new one takes the rest. A DeepSpeed mode gets a
    worker of its own under ``accelerate launch`` (``next_batch``), or a ``skipped`` row without one
    when it cannot run (``deepspeed_skip_reason``) or would overrun the budget."""
    rows: dict[str, Row] = {}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # data.cache_dir=auto (the default) keeps its latent cache with the rest of the run's files
    env.setdefault("DIFFALIGN_CACHE_HOME", str(args.work / "latent-cache"))
    # run-time compiled extensions (DeepSpeed's ops, none expected) land here, and the rows name them
    env["TORCH_EXTENSIONS_DIR"] = str(args.work / "torch-extensions")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the loop uses CUDA whenever it sees it
        # tiny models gain nothing from threads, and on a busy CPU OpenMP's spinning threads made a
        # tiny step take 16 s instead of 0.2 s
        env.setdefault("OMP_NUM_THREADS", "1")
    for attempt in range(1, len(args.modes) + 1):  # each worker settles at least one mode
        pending = [n for n in args.modes if n not in rows]
        if not pending or time.time() >= args.deadline:  # no time left even to import torch
            break
        batch = next_batch(pending)
        if (skipped := _skip_launch(batch[0], args)) is not None:  # no launcher started for nothing
            rows[skipped.mode] = skipped
            print(_progress(skipped), flush=True)
            continue
        later = [MODES[n].family for n in pending[len(batch) :]]  # folders a later worker needs
        results, log = args.work / f"worker-{attempt}.jsonl", args.work / f"worker-{attempt}.log"
        results.unlink(missing_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                _worker_cmd(args, batch, results, later), stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,  # its own process group: killed whole at the deadline
            )  # fmt: skip
            current, killed = _watch(proc, results, args, rows)
        reason = "killed at the time budget" if killed else _tail_reason(log, proc.returncode)
        for name in _dead(current, killed or any(n in rows for n in batch), batch, pending):
            rows[name] = describe(name, args.tiny, args.pairs)
            rows[name].status, rows[name].reason = "failed", reason
            print(_progress(rows[name]), flush=True)
    for name in args.modes:
        if name not in rows:
            rows[name] = describe(name, args.tiny, args.pairs)
            rows[name].status, rows[name].reason = "skipped", "time budget; rerun with --modes"
    return [rows[n] for n in args.modes]


def _skip_launch(name: str, args: Any) -> Row | None:
    """A DeepSpeed mode's ``skipped`` row when it cannot run here or would overrun the budget (its
    worker is not launched); None to launch it (and for every other mode)."""
    if not MODES[name].zero:
        return None
    why = deepspeed_skip_reason(name, args)
    need = mode_need_s(name, args)
    if why is None and time.time() + need > args.deadline:
        why = f"time budget (needs ~{need:.0f} s); rerun with --modes"
    if why is None:
        return None
    row = describe(name, args.tiny, args.pairs)
    row.status, row.reason = "skipped", why
    return row


def _dead(current: str | None, settled: bool, batch: list[str], pending: list[str]) -> list[str]:
    """The modes a worker that ended leaves failed: the one it was inside; none when it settled
    modes (or was killed at the budget) first; else it died before any mode."""
    if current is not None:
        return [current]
    if settled:
        return []
    if MODES[batch[0]].zero:  # its launch failed (accelerate, torchrun, deepspeed's import)
        return batch
    return [n for n in pending if not MODES[n].zero]  # an import error, say: another plain one would too


def _watch(proc: subprocess.Popen, results: Path, args: Any, rows: dict[str, Row]) -> tuple[str | None, bool]:
    """Collect a worker's rows as they come until it exits (killed past the budget): the mode it
    was inside when it ended (None: it finished its last one) and whether it was killed."""
    current, seen, killed = None, 0, False
    while True:
        done = proc.poll() is not None
        new, seen = _read(results, seen)
        for rec in new:
            if "env" in rec:
                args.env = rec["env"]
            elif "start" in rec:
                current = rec["start"]
            else:
                row = Row(**rec["row"])
                rows[row.mode], current = row, None
                print(_progress(row), flush=True)
        if done:
            return current, killed
        if time.time() > args.deadline + GRACE_S:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        time.sleep(0.5)


def _progress(row: Row) -> str:
    if row.status != "ok":
        return f"[{row.mode}] {row.status}: {row.reason}"
    return f"[{row.mode}] {row.per_s:.3f}/s, step {row.step_s:.3f} s, in {row.total_s:.0f} s"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


HEADER = (
    "| mode | model | FT | engine | attention | ckpt | reference | batch | pairs/s | step s | loop step_s "
    "| peak GiB | peak all | TFLOP/step | MFU | final save s | status |"
)


def table(rows: list[Row]) -> str:
    """Markdown table, one row per mode (Flow-GRPO's pairs/s column holds rollout images/s; engine:
    what the run started, ``-`` for a mode that did not run)."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason.replace('|', '/')}"
        cells = [
            r.mode,
            r.model,
            r.ft,
            r.engine or "-",
            r.attention,
            "on" if r.checkpointing else "off",
            r.reference,
            r.batch,
            _f(r.per_s, ".3f"),
            _f(r.step_s, ".3f"),
            _f(r.loop_step_s, ".3f"),
            _f(r.peak_gib, ".1f"),
            _f(r.peak_all_gib, ".1f"),
            _f(r.tflop_per_step, ".4g"),
            _f(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu is not None else ""),
            _f(r.checkpoint_s, ".1f"),
            status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _environment(device: str) -> str:
    import torch

    name = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "cpu"
    text = f"device: {name}, torch {torch.__version__}"
    if _has_deepspeed():
        from importlib.metadata import version

        text += f", deepspeed {version('deepspeed')}"
    return text


def parse_args(argv: list[str] | None) -> Any:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help="comma-separated, in run order; 'all': every mode, the opt-in DeepSpeed ones too "
        "(default: every mode but those)",
    )
    ap.add_argument("--list", action="store_true", help="print the modes and exit")
    ap.add_argument("--tiny", action="store_true", help="the tiny test pipelines (dry run)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", type=int, default=3, help="timed optimizer steps per mode")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (>= 1)")
    ap.add_argument("--pairs", type=int, default=None, help="pairs per step (default: per model)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default 989 on cuda)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpu_check"), help="models, data, run folders")
    ap.add_argument("--out", type=Path, default=None, help="write gpu_check.md and gpu_check.json here")
    ap.add_argument("--keep", action="store_true", help="keep the built model folders")
    ap.add_argument(
        "--final-checkpoint",
        action="store_true",
        help="let each run write its final checkpoint and export, and time it (off: the run stops before "
        "it). A full fine-tuning checkpoint holds the fp32 weights twice (trainable + export) and the "
        "optimizer state: ~100 GB for FLUX.1-dev (more than the GPU machine's disk), ~41 GB for SDXL",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--keep-families", default="", help=argparse.SUPPRESS)  # folders later workers need
    args = ap.parse_args(argv)
    args.modes = list(MODES) if args.modes.strip() == "all" else [m.strip() for m in args.modes.split(",")]
    args.modes = [m for m in args.modes if m]
    args.keep_families = [f for f in args.keep_families.split(",") if f]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; valid: {', '.join(MODES)}")
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be >= 1 (the first timed step starts where a warm-up one ends)")
    if args.peak_tflops is None and args.device == "cuda":
        args.peak_tflops = DEFAULT_PEAK_TFLOPS
    args.work = args.work.resolve()
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return []
    if args.list:
        for name in MODES:
            r = describe(name, args.tiny, args.pairs)
            ckpt = "checkpointing " + ("on" if r.checkpointing else "off")
            config = launch_config(name)
            how = f", accelerate launch {config.relative_to(REPO)} (opt-in)" if config else ""
            print(
                f"{name}: {r.model}, {r.ft}, {r.attention}, {ckpt}, reference {r.reference}, {r.batch}{how}"
            )
        return []
    args.deadline = time.time() + args.budget_s
    args.env = "device: unknown (no worker started)"
    args.work.mkdir(parents=True, exist_ok=True)
    for old in args.work.glob("worker-*"):  # logs of an earlier run in the same folder
        old.unlink()
    shutil.rmtree(args.work / "torch-extensions", ignore_errors=True)  # what this run builds, if anything
    rows = run_workers(args)  # the parent never touches the GPU (a CUDA context costs memory)
    text = f"{args.env}\n\n{table(rows)}"
    print("\n" + text, flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(text + "\n")
        (args.out / "gpu_check.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
        (args.out / "gpu_check-workers.log").write_text(_worker_tails(args.work))
    return rows


def _worker_tails(work: Path, lines: int = 150) -> str:
    """The end of each worker's log (full tracebacks of failed modes), for the files that come back."""
    parts = []
    for log in sorted(work.glob("worker-*.log")):
        text = log.read_text(errors="replace").replace("\r", "\n").splitlines()
        text = [ln for ln in text if ln.strip() and "%|" not in ln]  # not the progress bars
        parts.append(f"==> {log.name} <==\n" + "\n".join(text[-lines:]))
    return "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    main()
