"""``diffalign`` command line: one entry point, one subcommand per job.

    diffalign train CONFIG [key=value ...] [--resume [latest|PATH]]
    diffalign validate CONFIG [key=value ...]
    diffalign ls [objectives|families|rewards|samplers]
    diffalign cache CONFIG [key=value ...]
    diffalign synpic --prompts F --generator G [--generator G2] --reward R --out DIR
    diffalign label PAIRS.parquet OUT.parquet --reward R [--reward R2]
    diffalign export-pairs RANKED_DIR OUT.parquet [--mode best_worst|all] [--n N] [--allow-incomplete]
    diffalign demo [--out runs/demo] [--steps N]
    diffalign toy pretrain [--quick] | toy eval MODEL
    diffalign eval --model M [--compare M2] (--metadata F | --toy SPLIT | --prompts F) --out DIR
    diffalign train-spm --data PAIRS --model PIPE --clip CLIP --out DIR [--steps N]
    diffalign tiny FAMILY OUT_DIR [--prediction-type epsilon|v_prediction]

Errors the user can fix (bad config keys, unknown names, missing files, bad data rows) are
printed as one line ``error: ...`` with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any

TINY_CHOICES = (
    *("sd", "sdxl", "sd3", "sd35", "flux", "flux-schnell", "wan", "qwenimage"),
    *("animatediff", "text2video", "audioldm"),
)
"""``diffalign tiny`` names (= ``models.tiny.TINY_NAMES``, kept here so parsing imports no torch)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffalign", description="Preference alignment for diffusion models.")
    p.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error instead of its one line"
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    raw = argparse.RawDescriptionHelpFormatter
    config_help = "YAML config (sections model, lora, objective, data, train; see README 'Config reference')"
    overrides_help = (
        "KEY=VALUE overrides applied after the file, e.g. train.lr=1e-5 objective.beta=2500 "
        "data.path=pairs.parquet; lists as train.sample_prompts=[a cat, a dog]"
    )

    tr = sub.add_parser(
        "train",
        help="train with a YAML config and key=value overrides",
        formatter_class=raw,
        description="Train a LoRA or the full denoiser with "
        "the objective named in the config, through the one\n"
        "training loop. Everything that can be checked without weights is checked first (as `validate`).\n"
        "Checkpoints go to train.output_dir/checkpoints (export/ in each is plain diffusers format);\n"
        "metrics to metrics.jsonl and train.report_to (tensorboard, wandb or none).",
        epilog="examples:\n"
        "  diffalign train configs/sd15_dpo_lora.yaml train.lr=5e-6 train.output_dir=runs/dpo\n"
        "  diffalign train configs/sd15_dpo_lora.yaml --resume          # continue runs/dpo\n"
        "  accelerate launch --config_file configs/accelerate/ddp.yaml -m diffalign.cli train CONFIG",
    )
    tr.add_argument("config", help=config_help)
    tr.add_argument("overrides", nargs="*", help=overrides_help)
    _plugin_option(tr)
    tr.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="latest|CHECKPOINT",
        help="resume from the newest checkpoint of train.output_dir (or the given checkpoint folder); "
        "the run continues exactly as if it had not stopped",
    )
    tr.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: accept settings that differ from the run's config.yaml (e.g. a new lr); "
        "the change is recorded in config_changes.jsonl (without it such a resume is refused)",
    )

    va = sub.add_parser(
        "validate",
        help="check a config (keys, names, data columns) without loading models",
        formatter_class=raw,
        description="Check a config without loading any weights: unknown keys and names (with suggestions),\n"
        "types and ranges, the objective's hyperparameters and needs (reference, scores), the data\n"
        "source (exists, has the columns; a hub dataset id is cached when offline). Prints 'ok' or one\n"
        "error line naming the key and the fix (exit code 2).",
        epilog="example:\n  diffalign validate configs/sdxl_dpo_lora.yaml data.path=runs/pairs.parquet",
    )
    va.add_argument("config", help=config_help)
    va.add_argument("overrides", nargs="*", help=overrides_help)
    _plugin_option(va)

    ls = sub.add_parser("ls", help="list registered names")
    ls.add_argument(
        "kind", nargs="?", default="objectives", choices=["objectives", "families", "rewards", "samplers"]
    )

    ca = sub.add_parser(
        "cache",
        help="precompute latents and text embeddings into data.cache_dir",
        formatter_class=raw,
        description="Run the VAE and text encoders once over the config's data and store the results as\n"
        "sharded safetensors in data.cache_dir (resumable: rerun to continue). Train with the same\n"
        "data.cache_dir to skip both models during training; a cache made from other data or settings\n"
        "is refused, naming the file, weights or key that changed.",
        epilog="example:\n"
        "  diffalign cache configs/sd15_dpo_lora.yaml data.cache_dir=cache/pickapic\n"
        "  diffalign train configs/sd15_dpo_lora.yaml data.cache_dir=cache/pickapic",
    )
    ca.add_argument("config", help=config_help)
    ca.add_argument("overrides", nargs="*", help=overrides_help)
    _plugin_option(ca)

    sp = sub.add_parser("synpic", help="generate, score and rank a synthetic preference dataset (resumable)")
    sp.add_argument("--prompts", required=True, help=".txt (one per line) or .jsonl with a 'prompt' key")
    sp.add_argument(
        "--generator", action="append", required=True, help="pipeline folder or hub id (repeatable)"
    )
    sp.add_argument(
        "--reward", action="append", required=True, help="NAME or NAME=PATH, e.g. pickscore=PATH (repeatable)"
    )
    sp.add_argument(
        "--reward-weight",
        type=float,
        nargs="+",
        default=[],
        help="votes per win under each --reward, one per reward (default: 1 each)",
    )
    sp.add_argument("--out", required=True)
    sp.add_argument(
        "--images-per-generator",
        type=int,
        nargs="+",
        default=[2],
        help="images per prompt from each generator: one number for all, or one per --generator",
    )
    sp.add_argument("--steps", type=int, default=20)
    sp.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[5.0],
        help="guidance scale: one for all generators, or one per --generator",
    )
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--shard-size", type=int, default=64)
    sp.add_argument("--batch-prompts", type=int, default=16)
    sp.add_argument("--format", default="png", choices=["png", "jpeg"])
    sp.add_argument("--dedup", action="store_true", help="drop repeated prompts instead of refusing them")

    lb = sub.add_parser(
        "label",
        help="score a pair parquet with rewards; write scores and an AI-feedback label as columns",
        formatter_class=raw,
        description="Score both images of every pair with each reward and write a copy of the parquet with\n"
        "score_0.NAME / score_1.NAME columns and ai_label_0 "
        "from the rewards' vote (1 image 0 wins, 0 image 1\n"
        "wins, 0.5 tie); the original columns are kept. The scores feed SmPO (data.score_column=NAME).\n"
        "Memory stays flat (one row group at a time); the output appears only when complete.",
        epilog="example:\n"
        "  diffalign label pairs.parquet labelled.parquet --reward pickscore=yuvalkirstain/PickScore_v1 \\\n"
        "      --reward hpsv2 --resize 512",
    )
    lb.add_argument("data", help="Pick-a-Pic style pair parquet (caption, jpg_0, jpg_1)")
    lb.add_argument("out", help="output parquet (written atomically)")
    lb.add_argument(
        "--reward",
        action="append",
        required=True,
        help="NAME or NAME=PATH (repeatable); names as `diffalign "
        "ls rewards` lists them, e.g. pickscore, hpsv2",
    )
    lb.add_argument(
        "--resize", type=int, default=None, help="resize images to this square size before scoring"
    )

    ep = sub.add_parser("export-pairs", help="turn a ranked Syn-Pic folder into Pick-a-Pic style pairs")
    ep.add_argument("ranked")
    ep.add_argument("out")
    ep.add_argument("--mode", default="best_worst", choices=["best_worst", "all"])
    ep.add_argument(
        "--n", type=int, default=1, help="best_worst: each of the n best against each of the n worst"
    )
    ep.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="export the shards that verify when the set is unfinished or damaged (no valid index.json, "
        "or shards that do not match it), saying how many were left out; without it such a set is refused",
    )

    de = sub.add_parser(
        "demo", help="Syn-Pic + RankDPO + judged eval on the shipped ShapesWorld toy models (CPU, minutes)"
    )
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--model", default=None, help="policy pipeline (default: shipped toy-sd)")
    de.add_argument(
        "--generator",
        action="append",
        default=None,
        help="Syn-Pic generators (default: toy-sd, toy-sd3 and the policy unguided)",
    )
    de.add_argument(
        "--reward", action="append", default=None, help="NAME=PATH rewards (default: the two toy CLIPs)"
    )
    de.add_argument(
        "--objective",
        default="rankdpo",
        help="rankdpo (default), diffusion_dpo, kto, sft, or online: online_dpo, flow_grpo (toy-sd3), "
        "grpo (toy-sd), diffusion_nft (toy-sd3): no Syn-Pic, the policy samples its own groups; the "
        "policy-gradient ones are rewarded by the exact ShapesWorld judge unless --reward is given",
    )
    de.add_argument(
        "--beta", type=float, default=None, help="objective.beta (default 2000; online RL: its recipe's)"
    )
    de.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of 8 (the budget knob; default 800, ~4 min on 2 cores; online RL: 40 "
        "steps of 8 prompts x 8 samples, ~10 min)",
    )
    de.add_argument("--lr", type=float, default=1e-3)
    de.add_argument("--train-prompts", type=int, default=100)
    de.add_argument(
        "--images-per-generator",
        type=int,
        nargs="+",
        default=None,
        help="Syn-Pic images per prompt from each generator: one number for all, or one per generator "
        "(default 2 2 1 for toy-sd, toy-sd3 and the policy unguided)",
    )
    de.add_argument(
        "--synpic-guidance",
        type=float,
        nargs="+",
        default=None,
        help="Syn-Pic guidance per generator (default 4 4 1 for the default generators)",
    )
    de.add_argument("--eval-prompts", type=int, default=60)
    de.add_argument("--per-prompt", type=int, default=4)
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")

    from .benchmarks.toyworlds import cli as toy_cli

    toy_cli.add_parser(sub)

    from .benchmarks.geneval import harness as eval_cli

    eval_cli.add_parser(sub)

    sm = sub.add_parser("train-spm", help="train SPO's step-aware preference model on preference pairs")
    sm.add_argument("--data", required=True, help="pairs (parquet/JSONL/folder/hub id), winner by label")
    sm.add_argument(
        "--model", required=True, help="the diffusion pipeline whose noisy x0 predictions are judged"
    )
    sm.add_argument(
        "--clip", required=True, help="initial CLIPModel (PickScore in the paper) or an SPM folder"
    )
    sm.add_argument("--out", required=True)
    sm.add_argument("--steps", type=int, default=200)
    sm.add_argument("--batch-size", type=int, default=8)
    sm.add_argument("--lr", type=float, default=1e-4)
    sm.add_argument("--guidance", type=float, default=5.0)
    sm.add_argument("--resolution", type=int, default=512)
    sm.add_argument("--heldout", type=int, default=64)
    sm.add_argument(
        "--train-clip", action="store_true", help="fine-tune the whole CLIP too (the reference does)"
    )

    ti = sub.add_parser("tiny", help="build a tiny random-weight pipeline (for tests and dry runs)")
    ti.add_argument(
        "family",
        choices=TINY_CHOICES,
        help="one per family; sd35 (SD3.5-M: dual attention, qk-norm) and flux-schnell are variants",
    )
    ti.add_argument("out_dir")
    ti.add_argument(
        "--prediction-type",
        default="epsilon",
        choices=["epsilon", "v_prediction"],
        help="DDPM families (sd, sdxl, animatediff, text2video, audioldm) only",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Problems the user can fix end as one ``error:`` line and exit code 2 (a traceback with
    ``--debug``): config and data errors, missing or unwritable paths, a full disk."""
    args = _parser().parse_args(argv)
    from .config import ConfigError

    user_errors = (ConfigError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    try:
        return _run(args)
    except user_errors as e:
        if args.debug:
            raise
        _print_error(_one_line(e))
        return 2
    except OSError as e:
        if args.debug or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        _print_error(f"{_one_line(e)} (free some space or write elsewhere; finished work is kept)")
        return 2


def _print_error(message: str) -> None:
    """``error: ...`` on a line of its own, also right after a progress bar that was interrupted."""
    from tqdm.auto import tqdm

    tqdm.write(f"error: {message}", file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """The message on one line (OS errors name their file)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or type(e).__name__}"
    return " ".join(str(e).split()) or type(e).__name__


def _plugin_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first (repeatable): your own rewards or objectives register "
        "themselves on import, e.g. the toy judges: --plugin diffalign.benchmarks.toyworlds.judge_reward",
    )


def import_plugins(modules: list[str]) -> None:
    """Import the ``--plugin`` modules (before the config is read, so their registry names validate)."""
    import importlib

    from .config import ConfigError

    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError(
                f"--plugin {name}: cannot import {e.name!r} (a module on the Python path, dotted, "
                "e.g. diffalign.benchmarks.toyworlds.judge_reward)"
            ) from e


def _one_or_each(values: list) -> Any:
    """A ``nargs="+"`` per-generator option: one value stays a scalar (one for all generators)."""
    return values[0] if len(values) == 1 else values


def _run(args: argparse.Namespace) -> int:  # noqa: C901 (one branch per subcommand)
    from .config import load_config, validate

    if args.cmd == "ls":
        if args.kind == "objectives":
            from .objectives import OBJECTIVES

            for name, cls in OBJECTIVES.items():
                doc = (cls.__doc__ or "").strip().splitlines()[0]
                need = vars(cls)["needs_reference"]  # a bool, or a property of the hyperparameters
                ref = "reference" if need is True else "no reference" if need is False else "ref. if KL>0"
                print(f"{name:14s} {cls.kind:11s} {cls.source:8s} {ref:13s} {doc}")
        elif args.kind in ("rewards", "samplers"):
            from .rewards import REWARDS
            from .samplers import SAMPLERS

            for name, obj in (REWARDS if args.kind == "rewards" else SAMPLERS).items():
                print(f"{name:16s} {(obj.__doc__ or '').strip().splitlines()[0]}")
        else:
            from .models.loading import PIPELINE_FAMILIES

            for cls, fam in PIPELINE_FAMILIES.items():
                print(f"{fam:6s} {cls}")
        return 0
    if args.cmd == "synpic":
        from .synpic import SynPicConfig, run_synpic

        out = run_synpic(
            SynPicConfig(
                prompts=args.prompts,
                generators=args.generator,
                rewards=args.reward,
                reward_weights=args.reward_weight,
                out=args.out,
                images_per_generator=_one_or_each(args.images_per_generator),
                steps=args.steps,
                guidance=_one_or_each(args.guidance),
                seed=args.seed,
                shard_size=args.shard_size,
                batch_prompts=args.batch_prompts,
                image_format=args.format,
                dedup=args.dedup,
            )
        )
        print(f"ranked dataset: {out}")
        return 0
    if args.cmd == "label":
        from .label import label_pairs

        print(f"labelled: {label_pairs(args.data, args.reward, args.out, args.resize)}")
        return 0
    if args.cmd == "export-pairs":
        from .synpic import export_pairs

        print(f"pairs: {export_pairs(args.ranked, args.out, args.mode, args.n, args.allow_incomplete)}")
        return 0
    if args.cmd == "demo":
        from .demo import run_demo

        run_demo(
            args.out,
            args.model,
            args.generator,
            args.reward,
            args.objective,
            args.beta,
            args.steps,
            args.lr,
            n_train=args.train_prompts,
            n_eval=args.eval_prompts,
            per_prompt=args.per_prompt,
            seed=args.seed,
            overwrite=args.overwrite,
            images_per_generator=args.images_per_generator and _one_or_each(args.images_per_generator),
            synpic_guidance=args.synpic_guidance and _one_or_each(args.synpic_guidance),
        )
        return 0
    if args.cmd == "toy":
        from .benchmarks.toyworlds import cli as toy_cli

        return toy_cli.run(args)
    if args.cmd == "eval":
        from .benchmarks.geneval import harness as eval_cli

        return eval_cli.run_cli(args)
    if args.cmd == "train-spm":
        from .spm import SPMConfig, train_spm

        train_spm(
            SPMConfig(
                data=args.data,
                model=args.model,
                clip=args.clip,
                out=args.out,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                guidance_scale=args.guidance,
                resolution=args.resolution,
                heldout=args.heldout,
                train_clip=args.train_clip,
            )
        )
        return 0
    if args.cmd == "tiny":
        from ._quiet import quiet_libraries
        from .models.tiny import build_tiny_pipeline

        quiet_libraries()
        build_tiny_pipeline(args.family, args.out_dir, prediction_type=args.prediction_type)
        print(f"wrote tiny {args.family} pipeline to {args.out_dir}")
        return 0
    import_plugins(args.plugin)  # train, validate and cache: registry names the config may use
    cfg = load_config(args.config, args.overrides)
    if args.cmd == "validate":
        validate(cfg)
        print(f"ok: {args.config} (objective {cfg.objective.name}, model {cfg.model.path})")
        return 0
    if args.cmd == "cache":
        from .data.cache import build_cache

        validate(cfg)
        build_cache(cfg)
        return 0
    from .train import train

    train(cfg, resume=args.resume, allow_config_change=args.allow_config_change)
    return 0


def entry() -> None:
    """The ``diffalign`` command (and ``python -m diffalign.cli``): ``main``, then exit without the
    interpreter's final garbage collection. With torch, diffusers and transformers loaded that
    collection alone takes 1-2 s of every run's exit (more than the final checkpoint); everything the
    run wrote is closed by then (files, trackers, the reward process), and no object left for it has
    a finaliser with work to do. Not in ``main``: a caller that goes on (tests, notebooks) keeps its gc."""
    code = main()
    import gc

    gc.freeze()  # every live object to the permanent generation: shutdown's collection skips them
    sys.exit(code)


if __name__ == "__main__":
    entry()
