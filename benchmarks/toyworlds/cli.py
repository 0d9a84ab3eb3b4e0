"""``diffalign toy ...``: pretrain and evaluate the ShapesWorld toy models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    toy = sub.add_parser("toy", help="ShapesWorld toy models: pretrain, eval")
    ts = toy.add_subparsers(dest="toy_cmd", required=True)
    pre = ts.add_parser("pretrain", help="train the toy VAE, toy-sd and toy-sd3 from scratch (checkpointed, resumable)")
    pre.add_argument("--work", default="runs/toy-pretrain", help="checkpoint folder (rerun to continue)")
    pre.add_argument("--out", default="runs/toy-models", help="where the exported pipelines go")
    pre.add_argument("--minutes", type=float, nargs=3, default=[8.0, 90.0, 90.0], metavar=("VAE", "SD", "SD3"),
                     help="wall-clock minutes per stage (sd and sd3 run one after the other)")
    pre.add_argument("--quick", action="store_true", help="a few seconds per stage: checks the pipeline end to end")
    pre.add_argument("--stages", nargs="+", default=["vae", "sd", "sd3"], choices=["vae", "sd", "sd3"])
    ev = ts.add_parser("eval", help="judged GenEval-style score of a pipeline folder on ShapesWorld prompts")
    ev.add_argument("model")
    ev.add_argument("--split", default="heldout", choices=["train", "heldout"])
    ev.add_argument("--prompts", type=int, default=60)
    ev.add_argument("--per-prompt", type=int, default=4)
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--guidance", type=float, default=4.0)
    ev.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from ..._quiet import quiet_libraries

    quiet_libraries()
    if args.toy_cmd == "pretrain":
        from .pretrain import export_pipeline, train_stage

        work, out = Path(args.work), Path(args.out)
        minutes = dict(zip(["vae", "sd", "sd3"], [0.05, 0.05, 0.05] if args.quick else args.minutes, strict=True))
        for stage in args.stages:
            meta = train_stage(stage, work, minutes[stage], batch=8 if args.quick else 64)
            print(f"{stage}: {meta['images']} images in {meta['seconds'] / 60:.1f} min total")
            if stage != "vae":
                export_pipeline(stage, work, out / f"toy-{stage}")
                print(f"exported {out / f'toy-{stage}'}")
        return 0
    from ...models.loading import load_pipeline
    from .evaluate import evaluate_pipeline

    pipe, kw = load_pipeline(args.model)
    res = evaluate_pipeline(pipe, args.split, args.prompts, args.per_prompt, args.seed, args.steps, args.guidance, **kw)
    s = res["summary"]
    print(json.dumps({k: s[k] for k in ("overall", "overall_ci95", "per_tag")}, indent=2))
    return 0
