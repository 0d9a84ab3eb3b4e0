"""``diffalign eval``: GenEval-style judged evaluation and reward win rates, resumable.

    diffalign eval --model PATH_OR_RUN [--compare PATH_OR_RUN] --out DIR
        (--metadata evaluation_metadata.jsonl | --toy {heldout,train} | --geneval-templates [N]
         | --prompts FILE [--prompts FILE ...])
        [--n-prompts N] [--per-prompt 4] [--steps N] [--guidance G] [--size PX] [--seed 0]
        [--detector shapes|mask2former|mask2former=PATH] [--color-clip PATH]
        [--reward NAME=PATH ...] [--pairing all|seed] [--batch 16] [--device cpu|cuda]

Prompt sets: a GenEval ``evaluation_metadata.jsonl`` (``--metadata``), ShapesWorld prompts
(``--toy``), a GenEval-style suite built from GenEval's templates over the COCO classes
(``--geneval-templates N``: N draws per tag, seed ``--prompt-seed``, default 43 = GenEval's file), or
plain prompt files for reward-only evaluation (``--prompts``: PartiPrompts ``.tsv``, HPSv2 benchmark
``.json``, ``.txt``, ``.jsonl``; repeatable, one category per file). ``--n-prompts`` keeps N prompts
balanced over tags (categories), in file order (for ``--toy``: N distinct prompts, or all the split has).

Models: a diffusers pipeline folder or hub id, or a diffalign run/checkpoint folder (its trained
weights are applied). ``--model`` is A ("base"), ``--compare`` is B ("aligned"); win rates are B's.

Run folder (rerunning the same command continues; finished images are never regenerated,
judgements and reward scores are cached per image, keyed by the image's hash):

    DIR/eval.json                 settings; a rerun with other generation settings given is refused
    DIR/prompts.jsonl             the prompt set (GenEval metadata format when judged)
    DIR/<model|compare>/          a GenEval image folder: 00000/metadata.jsonl, 00000/samples/00000.png, ...
    DIR/<model|compare>/results.jsonl   GenEval's per-image results (filename, tag, prompt, correct,
                                  reason, metadata, details) plus prompt_index, sample, seed
    DIR/<model|compare>/summary.json    per-tag and overall accuracy (overall = mean of tag
                                  accuracies) with cluster-bootstrap CIs (distinct prompts
                                  resampled within tags), distinct prompts per tag
    DIR/summary.json              everything: settings, per-model summaries, paired differences,
                                  reward statistics and win rates
    DIR/report/                   report.md, index.html (self-contained), metrics.json, PNGs

Sampling settings (steps, guidance, size, ``--per-prompt``, ``--batch``): given flags, else the base
model's earlier eval in ``--out`` (a ``--compare`` added later inherits them), else 20 steps / guidance
4 with ``--toy`` and GenEval's 50 / 9 otherwise, 4 images per prompt in batches of 16;
printed in one line at the start, recorded in summary.json (``sampling``) and the report header (see
``settings.py``). Statistics resample distinct prompts with all their images (``stats.py``).

Modules: ``settings`` (EvalConfig, sampling settings, the folder's manifest), ``prompts`` (prompt
sets), ``generation`` (models, image folders, images: one fixed seed per (prompt, sample)),
``judging`` (detector verdicts and reward scores, cached per image), ``stats`` (summaries and
cluster-bootstrap CIs), ``report``; this module runs them and holds the command line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .detectors import Thresholds
from .metadata import write_metadata
from .prompts import prompt_set
from .settings import (
    EvalConfig,
    check_and_record,
    check_options,
    read_manifest,
    resolve_sampling,
    sampling_line,
    write_json,
)
from .stats import paired_difference, summarize_results


def _check_names(cfg: EvalConfig, detector_spec: str | None) -> None:
    """Unknown detector or reward names fail before anything is generated."""
    from ...rewards import REWARDS

    if detector_spec is not None and detector_spec.partition("=")[0] not in ("shapes", "mask2former"):
        raise ConfigError(f"unknown detector {detector_spec!r}; valid: shapes, mask2former, mask2former=PATH")
    for spec in cfg.rewards:
        REWARDS.get(spec.partition("=")[0])


def run_eval(cfg: EvalConfig, log=print) -> dict[str, Any]:  # noqa: C901 (the eval run read top to bottom: checks, generation, judging, summary)
    """Run (or continue) an evaluation; returns the contents of ``DIR/summary.json`` (plus
    ``generated``: images made by this call per model)."""
    t0 = time.time()
    check_options(cfg)  # every option's range, the out folder and the models, before any work or import
    rows, judged, description = prompt_set(cfg)
    from ..._quiet import quiet_libraries
    from ...models.loading import default_device
    from . import detectors
    from .generation import generate_missing, prepare_folders
    from .judging import judge_folder, reward_key, score_folder

    quiet_libraries()
    toy = cfg.toy is not None
    device = default_device(cfg.device)
    detector_spec = cfg.detector or ("shapes" if toy else "mask2former")
    _check_names(cfg, detector_spec if judged else None)
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    models = {"model": cfg.model, **({"compare": cfg.compare} if cfg.compare else {})}

    # sampling settings: given, else inherited from the base model's earlier eval here, else defaults;
    # a model's images already in this folder must have been made with the same settings
    manifest = read_manifest(root)
    sampling = resolve_sampling(cfg, manifest)
    # images per prompt and batch size set the batch grid the images are made on: resolved like steps
    cfg = replace(cfg, per_prompt=sampling["per_prompt"], batch=sampling["batch"])
    check_and_record(root, cfg, models, sampling, manifest)
    manifest.update(
        {
            "prompt_set": description,
            "judged": judged,
            "per_prompt": cfg.per_prompt,
            "detector": detector_spec if judged else None,
            "rewards": list(cfg.rewards),
        }
    )
    write_json(root / "eval.json", manifest)
    write_metadata(root / "prompts.jsonl", rows)
    log(f"eval: {description}; {len(models)} model(s) x {cfg.per_prompt} images per prompt -> {root}")
    log(f"sampling: {sampling_line(sampling)}")

    generated: dict[str, int] = {}
    for label, spec in models.items():
        folder = root / label
        prepare_folders(folder, rows)
        generated[label] = generate_missing(folder, rows, spec, cfg, device, sampling, log)
    t_gen = time.time()

    summaries: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    if judged:
        state: dict[str, detectors.Detector] = {}

        def detector_fn() -> detectors.Detector:
            if "d" not in state:
                state["d"] = detectors.build_detector(detector_spec, device, cfg.color_clip, cfg.thresholds)
            return state["d"]

        judge_key = json.dumps(
            {"detector": detector_spec, "color_clip": cfg.color_clip, "thresholds": cfg.thresholds.as_dict()},
            sort_keys=True,
        )
        for label in models:
            results[label] = judge_folder(root / label, root, rows, cfg, detector_fn, judge_key, log)
            summaries[label] = summarize_results(results[label], cfg.n_boot, cfg.seed)
            write_json(root / label / "summary.json", summaries[label])
    t_judge = time.time()

    reward_scores: dict[str, dict[str, list[list[float]]]] = {}
    reward_stats: dict[str, dict[str, Any]] = {}
    for spec in cfg.rewards:
        key = reward_key(spec, cfg.rewards)
        holder: dict[str, Any] = {}

        def reward_fn(spec: str = spec, holder: dict[str, Any] = holder):
            if "r" not in holder:
                from ...rewards import load_rewards

                holder["r"] = next(iter(load_rewards([spec], device).values()))
            return holder["r"]

        reward_scores[key] = {
            label: score_folder(root / label, rows, cfg, spec, reward_fn, log) for label in models
        }
        from .winrate import score_summary

        reward_stats[key] = {
            label: score_summary(s, cfg.n_boot, cfg.seed) for label, s in reward_scores[key].items()
        }
    win_rates: dict[str, Any] = {}
    if cfg.compare and reward_scores:
        from .winrate import win_rates_by_reward

        cats = None if judged else [r.get("category", "") for r in rows]
        win_rates = win_rates_by_reward(
            reward_scores, "model", "compare", cats, pairing=cfg.pairing, n_boot=cfg.n_boot, seed=cfg.seed
        )
    t_rew = time.time()

    out: dict[str, Any] = {
        "settings": {
            **{k: v for k, v in asdict(cfg).items() if k != "thresholds"},
            "steps": sampling["steps"],
            "guidance": sampling["guidance"],
            "size": sampling["size"],
            "device": device,
            "detector": detector_spec if judged else None,
            "thresholds": cfg.thresholds.as_dict(),
        },
        "sampling": sampling,
        "prompt_set": description,
        "n_prompts": len(rows),
        "n_distinct_prompts": len({r["prompt"] for r in rows}),
        "judged": judged,
        "models": {
            label: {"path": spec, **({"geneval": summaries[label]} if judged else {})}
            for label, spec in models.items()
        },
    }
    if judged and cfg.compare:
        out["difference"] = paired_difference(results["model"], results["compare"], cfg.n_boot, cfg.seed)
    if reward_stats:
        out["rewards"] = reward_stats
    if win_rates:
        out["win_rates"] = win_rates
    out["timing"] = {"generate_s": t_gen - t0, "judge_s": t_judge - t_gen, "rewards_s": t_rew - t_judge}
    write_json(root / "summary.json", out)
    if cfg.report:
        from .report import build_report

        page = build_report(root, out, rows, results, reward_scores, cfg.per_prompt)
        log(f"report: {page}")
    out["generated"] = generated
    return out


# --------------------------------------------------------------------------- CLI


def add_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "eval",
        help="GenEval-style judged eval and reward win rates of a model (vs another), resumable",
        description="GenEval-style evaluation (judged by an object detector and GenEval's rules) and reward "
        "win rates. Rerun the same command on the same --out to continue an interrupted run.",
    )
    ev.add_argument(
        "--model", required=True, help="pipeline folder, hub id, or diffalign run folder (model A, 'base')"
    )
    ev.add_argument(
        "--compare",
        default=None,
        help="second model (B, 'aligned'): before/after report, paired differences, win rates of B over A",
    )
    src = ev.add_mutually_exclusive_group(required=True)
    src.add_argument("--metadata", help="GenEval evaluation_metadata.jsonl")
    src.add_argument(
        "--toy", choices=["heldout", "train"], help="ShapesWorld prompts (judged by the exact toy detector)"
    )
    src.add_argument(
        "--toy-video",
        choices=["heldout", "train"],
        help="ShapesWorld-video prompts, clips judged exactly (a text-to-video model)",
    )
    src.add_argument(
        "--toy-audio",
        choices=["heldout", "train"],
        help="ToneWorld prompts, audio judged exactly (a text-to-audio model)",
    )
    src.add_argument(
        "--geneval-templates",
        dest="templates",
        type=int,
        nargs="?",
        const=100,
        metavar="N",
        help="build a GenEval-style suite from GenEval's templates over the COCO classes, N draws per tag "
        "(default 100; with --prompt-seed 43 it is GenEval's own 553-prompt file)",
    )
    src.add_argument(
        "--prompts",
        action="append",
        help="plain prompt file for reward-only eval: PartiPrompts .tsv, "
        "HPSv2 benchmark .json, .txt, .jsonl (repeatable)",
    )
    ev.add_argument(
        "--n-prompts",
        type=int,
        default=None,
        help="use N prompts, balanced over tags/categories (--toy: N distinct, default 60)",
    )
    ev.add_argument(
        "--prompt-seed", type=int, default=None, help="seed of --toy (0) / --geneval-templates (43) prompts"
    )
    ev.add_argument(
        "--per-prompt",
        type=int,
        default=None,
        help="images per prompt (default: the base model's earlier eval in --out, else 4 as GenEval)",
    )
    ev.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampling steps (default: the base model's earlier eval in --out, else 20 with --toy, else 50 "
        "as GenEval; the demo uses 15)",
    )
    ev.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale (default: the base model's earlier eval in --out, else 4.0 with --toy, else 9.0 as "
        "GenEval; the demo uses 4)",
    )
    ev.add_argument(
        "--size",
        type=int,
        default=None,
        help="image height and width (default: the base model's earlier eval in --out, else the pipeline's)",
    )
    ev.add_argument("--seed", type=int, default=0, help="base seed; image (i, k) uses image_seed(seed, i, k)")
    ev.add_argument(
        "--detector",
        default=None,
        help="shapes | mask2former | mask2former=PATH (hub id or folder; "
        "default shapes with --toy, else mask2former)",
    )
    ev.add_argument(
        "--color-clip",
        default=None,
        help="CLIP for colour classification (transformers or OpenCLIP "
        "folder / hub id; default openai/clip-vit-large-patch14)",
    )
    ev.add_argument(
        "--threshold", type=float, default=Thresholds.score, help="detection confidence (GenEval 0.3)"
    )
    ev.add_argument(
        "--counting-threshold", type=float, default=Thresholds.counting, help="for counting (GenEval 0.9)"
    )
    ev.add_argument("--max-objects", type=int, default=Thresholds.max_objects, help="per class (GenEval 16)")
    ev.add_argument(
        "--position-threshold", type=float, default=Thresholds.position, help="position margin (GenEval 0.1)"
    )
    ev.add_argument(
        "--reward", action="append", default=[], help="NAME or NAME=PATH, e.g. pickscore=PATH (repeatable)"
    )
    ev.add_argument(
        "--pairing",
        default="all",
        choices=["all", "seed"],
        help="win-rate comparisons per prompt: every B image vs every A image, or same-seed pairs",
    )
    ev.add_argument(
        "--batch",
        type=int,
        default=None,
        help="images per generation / scoring batch (default: the base model's earlier eval in --out, "
        "else 16; images are made on a fixed batch grid, so a folder keeps its batch size)",
    )
    ev.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ev.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for CIs")
    ev.add_argument("--no-report", action="store_true", help="skip the HTML/markdown report")
    ev.add_argument("--out", required=True, help="run folder (rerun to continue)")


def run_cli(args: argparse.Namespace) -> int:
    if args.toy_video or args.toy_audio:
        return run_av_cli(args)
    cfg = EvalConfig(
        model=args.model,
        out=args.out,
        compare=args.compare,
        metadata=args.metadata,
        toy=args.toy,
        templates=args.templates,
        prompts=args.prompts or [],
        n_prompts=args.n_prompts,
        prompt_seed=args.prompt_seed,
        per_prompt=args.per_prompt,
        steps=args.steps,
        guidance=args.guidance,
        size=args.size,
        seed=args.seed,
        detector=args.detector,
        color_clip=args.color_clip,
        thresholds=Thresholds(
            args.threshold,
            args.counting_threshold,
            args.max_objects,
            Thresholds.nms_iou,
            args.position_threshold,
        ),
        rewards=args.reward,
        pairing=args.pairing,
        batch=args.batch,
        device=args.device,
        n_boot=args.bootstrap,
        report=not args.no_report,
    )
    out = run_eval(cfg)
    print(format_summary(out))
    return 0


def run_av_cli(args: argparse.Namespace) -> int:
    """``--toy-video`` / ``--toy-audio``: the toy video / audio worlds, judged exactly
    (see toyworlds/av_bench.py)."""
    from ..toyworlds.av_bench import World, evaluate_and_report

    name, split = ("video", args.toy_video) if args.toy_video else ("audio", args.toy_audio)
    if name == "video":
        from ..toyworlds import video as mod

        w = World("video", "", "", mod.prompts, mod.judge_clip)
    else:
        from ..toyworlds import tones as mod

        w = World("audio", "", "", mod.prompts, mod.judge_audio)  # type: ignore[arg-type]
    models = {"model": args.model} | ({"compare": args.compare} if args.compare else {})
    out = evaluate_and_report(
        w,
        models,
        Path(args.out),
        split,
        args.n_prompts or 60,
        args.per_prompt if args.per_prompt is not None else 4,
        args.seed if args.prompt_seed is None else args.prompt_seed,
        args.steps or 15,
        args.guidance if args.guidance is not None else 4.0,
        device=args.device,
    )
    print(out["table"])
    print(f"report: {Path(args.out) / 'index.html'}")
    return 0


def format_summary(out: Mapping[str, Any]) -> str:
    """A short plain-text table of the results for the console."""
    lines = []
    if out.get("judged"):
        labels = list(out["models"])
        tags = list(next(iter(out["models"].values()))["geneval"]["per_tag"])
        lines.append("tag".ljust(14) + "".join(lb.rjust(10) for lb in labels))
        for t in tags:
            lines.append(
                t.ljust(14) + "".join(f"{out['models'][lb]['geneval']['per_tag'][t]:10.3f}" for lb in labels)
            )
        lines.append(
            "overall".ljust(14) + "".join(f"{out['models'][lb]['geneval']['overall']:10.3f}" for lb in labels)
        )
        if "difference" in out:
            d = out["difference"]
            lines.append(
                f"compare - model: {d['overall']:+.3f} (95% CI [{d['overall_ci95'][0]:+.3f}, "
                f"{d['overall_ci95'][1]:+.3f}])"
            )
    for key, per_model in out.get("rewards", {}).items():
        stats = ", ".join(
            f"{lb} mean {s['mean']:.4g} median {s['median']:.4g}" for lb, s in per_model.items()
        )
        lines.append(f"{key}: {stats}")
        if key in out.get("win_rates", {}):
            w = out["win_rates"][key]
            lines.append(
                f"  win rate of compare: mean {w['win_rate_mean']:.3f} [{w['win_rate_mean_ci95'][0]:.3f}, "
                f"{w['win_rate_mean_ci95'][1]:.3f}], median {w['win_rate_median']:.3f}"
            )
    return "\n".join(lines)
