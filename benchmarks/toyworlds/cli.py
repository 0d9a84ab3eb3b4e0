"""``diffalign toy ...``: pretrain and evaluate the ShapesWorld toy models."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ...errors import ConfigError

IMAGE_STAGES = ("vae", "sd", "sd3")
AV_STAGES = ("video", "avae", "vocoder", "audio")


def add_parser(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy", help="ShapesWorld toy models: pretrain, eval")
    ts = toy.add_subparsers(dest="toy_cmd", required=True)
    pre = ts.add_parser(
        "pretrain", help="train the toy VAE, toy-sd and toy-sd3 from scratch (checkpointed, resumable)"
    )
    pre.add_argument("--work", default="runs/toy-pretrain", help="checkpoint folder (rerun to continue)")
    pre.add_argument("--out", default="runs/toy-models", help="where the exported pipelines go")
    pre.add_argument(
        "--minutes",
        type=float,
        nargs=3,
        default=[8.0, 90.0, 90.0],
        metavar=("VAE", "SD", "SD3"),
        help="wall-clock minutes per stage (sd and sd3 run one after the other)",
    )
    pre.add_argument(
        "--quick", action="store_true", help="a few seconds per stage: checks the pipeline end to end"
    )
    pre.add_argument(
        "--stages",
        nargs="+",
        default=["vae", "sd", "sd3"],
        choices=[*IMAGE_STAGES, *AV_STAGES],
        help="image stages (vae sd sd3), the video model (video: AnimateDiff on toy-sd) and the audio "
        "model (avae vocoder audio: a tiny AudioLDM)",
    )
    pre.add_argument(
        "--av-minutes",
        type=float,
        nargs=4,
        default=[95.0, 13.0, 6.0, 40.0],
        metavar=("VIDEO", "AVAE", "VOCODER", "AUDIO"),
        help="wall-clock minutes of the video/audio stages",
    )
    pre.add_argument(
        "--audio-conditioning",
        default="pooled",
        choices=["pooled", "tokens"],
        help="how the audio UNet reads the caption: pooled CLAP embedding (AudioLDM) or cross-attention "
        "to its token states (Tango)",
    )
    pre.add_argument(
        "--audio-init",
        default=None,
        help="a previous run's audio checkpoint folder (WORK/audio) to start a new audio run from, "
        "wherever tensor names and shapes match",
    )
    pre.add_argument(
        "--video-freeze-spatial",
        action="store_true",
        help="train only the motion modules (lr 1e-3) and the text encoder (lr 1e-4), batch 8, EMA 0.995 "
        "(AnimateDiff's recipe; ~3x faster per clip on a CPU)",
    )
    pre.add_argument(
        "--video-base", default=None, help="toy-sd folder the video model starts from (default: shipped)"
    )
    pre.add_argument(
        "--restart-optimizer",
        action="store_true",
        help="continue image stages from their EMA weights with a fresh AdamW (how toy-sd v2 was made)",
    )
    pre.add_argument(
        "--device",
        default=None,
        help="torch device for the networks, e.g. cpu, cuda, cuda:1 "
        "(default: cuda when available, else cpu); "
        "checkpoints are device-free, so a run can continue on another machine",
    )
    ev = ts.add_parser("eval", help="judged GenEval-style score of a pipeline folder on ShapesWorld prompts")
    ev.add_argument("model")
    ev.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ev.add_argument("--prompts", type=int, default=60)
    ev.add_argument("--per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=4.0)
    ev.add_argument("--seed", type=int, default=0)


def _check_numbers(checks: list[tuple[str, object, float, bool]]) -> None:
    """(option, value, lowest allowed, integer?): one line naming the first option out of range."""
    for flag, value, lo, integer in checks:
        ok_type = isinstance(value, int if integer else int | float) and not isinstance(value, bool)
        if not ok_type or not math.isfinite(value) or value < lo:  # type: ignore[arg-type, operator]
            kind = "an integer" if integer else "a finite number"
            raise ConfigError(f"toy {flag}: must be {kind} >= {lo:g}, got {value!r}")


def check_args(args: argparse.Namespace) -> None:
    """Every number of ``toy pretrain`` / ``toy eval``, before any model loads or folder is written."""
    if args.toy_cmd == "pretrain":
        for m in [*args.minutes, *args.av_minutes]:
            if not math.isfinite(m) or m <= 0:
                raise ConfigError(f"toy pretrain --minutes/--av-minutes: must be finite and > 0, got {m!r}")
        return
    model = str(args.model)
    if (model.startswith((".", "/", "~")) or model.count("/") != 1) and not Path(model).expanduser().exists():
        raise ConfigError(f"toy eval: model {model!r} does not exist (give a pipeline folder or a hub id)")
    _check_numbers(
        [
            ("eval --prompts", args.prompts, 1, True),
            ("eval --per-prompt", args.per_prompt, 1, True),
            ("eval --steps", args.steps, 1, True),
            ("eval --guidance", args.guidance, 0, False),
            ("eval --seed", args.seed, 0, True),
        ]
    )


def run(args: argparse.Namespace) -> int:
    from ..._quiet import quiet_libraries

    check_args(args)
    quiet_libraries()
    if args.toy_cmd == "pretrain":
        import torch

        from ...models.loading import default_device
        from .pretrain import export_pipeline, train_stage

        work, out = Path(args.work), Path(args.out)
        device = default_device(args.device)
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ConfigError(
                f"toy pretrain --device {device!r} is not usable here ({str(e).splitlines()[0]})"
            ) from None
        minutes = dict(
            zip(
                [*IMAGE_STAGES, *AV_STAGES],
                [0.05] * 7 if args.quick else [*args.minutes, *args.av_minutes],
                strict=True,
            )
        )
        for stage in args.stages:
            if stage in AV_STAGES:
                _pretrain_av(stage, work, out, minutes[stage], args, device)
                continue
            meta = train_stage(
                stage,
                work,
                minutes[stage],
                batch=8 if args.quick else 64,
                device=device,
                restart_optimizer=args.restart_optimizer,
            )
            print(f"{stage}: {meta['images']} images in {meta['seconds'] / 60:.1f} min total")
            if stage != "vae":
                export_pipeline(stage, work, out / f"toy-{stage}")
                print(f"exported {out / f'toy-{stage}'}")
        return 0
    from ...models.loading import load_pipeline
    from .evaluate import evaluate_pipeline

    pipe, kw = load_pipeline(args.model)
    res = evaluate_pipeline(
        pipe, args.split, args.prompts, args.per_prompt, args.seed, args.steps, args.guidance, **kw
    )
    s = res["summary"]
    print(json.dumps({k: s[k] for k in ("overall", "overall_ci95", "per_tag")}, indent=2))
    return 0


def _pretrain_av(
    stage: str, work: Path, out: Path, minutes: float, args: argparse.Namespace, device: str
) -> None:
    quick = args.quick
    if stage == "video":
        from ...demo import asset
        from .pretrain_video import export_video_pipeline, train_video

        base = args.video_base or asset("toy-sd")
        recipe = {"lr": 1e-3, "ema_decay": 0.995, "freeze_spatial": True} if args.video_freeze_spatial else {}
        batch = 2 if quick else (8 if args.video_freeze_spatial else 16)
        meta = train_video(work, base, minutes, batch=batch, device=device, **recipe)
        print(f"video: {meta['clips']} clips in {meta['seconds'] / 60:.1f} min total")
        print(f"exported {export_video_pipeline(work, base, out / 'toy-video')}")
        return
    from .pretrain_audio import export_audio_pipeline, train_audio_stage

    meta = train_audio_stage(
        stage,
        work,
        minutes,
        batch=2 if quick else (16 if stage == "vocoder" else 32),  # type: ignore[arg-type]
        device=device,
        text_conditioning=args.audio_conditioning,
        init_from=Path(args.audio_init) if args.audio_init else None,
    )
    print(f"{stage}: {meta['clips']} clips in {meta['seconds'] / 60:.1f} min total")
    if stage == "audio":
        print(f"exported {export_audio_pipeline(work, out / 'toy-audio')}")
