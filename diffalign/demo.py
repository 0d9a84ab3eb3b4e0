"""``diffalign demo``: the whole alignment pipeline on ShapesWorld, on a CPU, in minutes.

1. Syn-Pic: held-in ShapesWorld prompts x the toy generators x k images, scored by the toy CLIP
   reward ensemble, ranked by vote aggregation (labels never come from the judge). By default 2
   images from toy-sd, 2 from toy-sd3 and 1 from the policy sampled without guidance: the unguided
   image is usually a clear loser, and without such negatives the toy-reward rankings of two
   comparable generators taught the policy to lose held-out counting (benchmarks/RESULTS.md);
2. RankDPO (or any objective) with LoRA on the policy model (toy-sd by default);
3. judged GenEval-style evaluation of base vs aligned on distinct held-out prompts (colour/shape/relation
   combinations never seen in training), with a paired cluster-bootstrap CI on the gain (distinct
   prompts resampled with all their images);
4. a report folder: per-tag table, before/after pairs captioned with their prompts, the prompt list,
   loss curve, per-tag bars, metrics JSON.
"""

from __future__ import annotations

import json
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError

ASSETS = Path(str(resources.files("diffalign"))) / "assets"


def asset(name: str) -> str:
    p = ASSETS / name
    if not (p / "model_index.json").exists() and not (p / "config.json").exists():
        raise ConfigError(
            f"shipped toy asset {name!r} is missing at {p}; run "
            "`diffalign toy pretrain` and pass paths explicitly"
        )
    return str(p)


# Objectives the demo trains with its shared recipe (beta, lr, steps); the others need their own data
# or settings (MaPO's beta, SmPO's scores, DCPO's pairs, SPO's step model): see objective_bench.
DEMO_OBJECTIVES = (
    "rankdpo",
    "diffusion_dpo",
    "kto",
    "sft",
    "online_dpo",
    "flow_grpo",
    "grpo",
    "diffusion_nft",
)
DEMO_OUTPUTS = (
    "prompts.txt",
    "prompts.jsonl",
    "synpic",
    "pairs.parquet",
    "cache",
    "run",
    "report",
    "results.jsonl",
)
# Online RL in the demo: the policy model, the default number of steps (each samples and judges
# batch_size x group_size images) and the recipe. The reward is the exact ShapesWorld judge's partial
# credit on the training prompts (the toy analogue of Flow-GRPO's GenEval reward) unless --reward is given.
RL_RECIPES: dict[str, tuple[str, int, list[str]]] = {
    "flow_grpo": ("toy-sd3", 40, ["objective.group_size=8", "objective.clip_range=1e-3", "objective.beta=0"]),
    "grpo": (
        "toy-sd",
        40,
        ["objective.group_size=8", "objective.clip_range=1e-3", "objective.timestep_fraction=0.5"],
    ),
    "diffusion_nft": ("toy-sd3", 40, ["objective.group_size=8", "objective.guidance_scale=1"]),
}


def train_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct held-in ShapesWorld prompts (fewer if the split has fewer)."""
    from .benchmarks.geneval.metadata import shapes_prompts

    return [md["prompt"] for md in shapes_prompts("train", n, seed)]


def _bad(value: Any, lo: float, integer: bool, above: bool = False) -> bool:
    """Not a number (or not an integer where one is needed), not finite, or below ``lo`` (or at it)."""
    import math

    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        return True
    return not math.isfinite(value) or value < lo or (above and value == lo)


def check_demo_options(
    steps: int,
    lr: float,
    beta: float | None,
    n_train: int,
    n_eval: int,
    per_prompt: int,
    sample_steps: int,
    guidance: float,
    batch_size: int,
    seed: int,
    synpic_guidance: float | list[float] | None = None,
) -> None:
    """Every number the demo takes, in one line naming its option, before any file or minute of work
    (beta too when the objective ignores it: a negative beta is a typo either way)."""
    checks: list[tuple[str, Any, float, bool, bool]] = [  # option, value, lowest, integer, strictly above
        ("--steps (train.max_steps)", steps, 1, True, False),
        ("--lr (train.lr)", lr, 0, False, True),
        *([("--beta (objective.beta)", beta, 0, False, True)] if beta is not None else []),
        ("--train-prompts", n_train, 1, True, False),
        ("--eval-prompts", n_eval, 1, True, False),
        ("--per-prompt", per_prompt, 1, True, False),
        ("sample_steps", sample_steps, 1, True, False),
        ("guidance", guidance, 0, False, False),
        ("batch_size", batch_size, 1, True, False),
        ("--seed", seed, 0, True, False),
    ]
    gs = synpic_guidance if isinstance(synpic_guidance, list) else [synpic_guidance]
    checks += [("--synpic-guidance", g, 0, False, False) for g in gs if g is not None]
    for flag, value, lo, integer, above in checks:
        if _bad(value, lo, integer, above):
            kind = "an integer" if integer else "a finite number"
            raise ConfigError(f"demo {flag}: must be {kind} {'>' if above else '>='} {lo:g}, got {value!r}")
    if lr > 1:
        raise ConfigError(f"demo --lr (train.lr): must be <= 1, got {lr:g}")


def run_demo(  # noqa: C901 (the demo pipeline, read top to bottom)
    out: str = "runs/demo",
    model: str | None = None,
    generators: list[str] | None = None,
    rewards: list[str] | None = None,
    objective: str = "rankdpo",
    beta: float | None = None,
    steps: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 8,
    n_train: int = 100,
    images_per_generator: int | list[int] | None = None,
    n_eval: int = 60,
    per_prompt: int = 4,
    sample_steps: int = 15,
    guidance: float = 4.0,
    seed: int = 0,
    overwrite: bool = False,
    synpic_guidance: float | list[float] | None = None,
) -> dict[str, Any]:
    """``images_per_generator`` and ``synpic_guidance`` (Syn-Pic's guidance per generator; ``guidance``
    is the evaluation's) default to [2, 2, 1] and [guidance, guidance, 1] for the default generators
    (toy-sd, toy-sd3, the policy unguided), and to 2 and ``guidance`` for generators you pass.
    ``beta`` and ``steps`` default to 2000 and 800, and for the online RL objectives (``RL_RECIPES``)
    to their recipe's (the judge-rewarded policy-gradient methods sample every step)."""
    if objective not in DEMO_OBJECTIVES:  # before any work (and before the heavy imports)
        from .registry import suggest

        raise ConfigError(
            f"demo --objective {objective!r}: not one the demo wires "
            f"up.{suggest(objective, list(DEMO_OBJECTIVES))} Every objective "
            "runs in `python -m diffalign.benchmarks.toyworlds.objective_bench`."
        )
    rl = RL_RECIPES.get(objective)  # online RL: its own model, step count and recipe
    steps = steps if steps is not None else rl[1] if rl else 800
    beta = beta if beta is not None or rl else 2000.0
    check_demo_options(
        steps,
        lr,
        beta,
        n_train,
        n_eval,
        per_prompt,
        sample_steps,
        guidance,
        batch_size,
        seed,
        synpic_guidance,
    )
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"demo --out {out!r} is a file, not a folder; give a folder for the demo's outputs")
    local = model is not None and (model.startswith((".", "/", "~")) or model.count("/") != 1)
    if local and not Path(model).expanduser().exists():
        raise ConfigError(f"demo --model {model!r} does not exist (expected a pipeline folder or a hub id)")
    from ._quiet import quiet_libraries
    from .benchmarks.geneval.metadata import shapes_prompts
    from .benchmarks.geneval.stats import overall_gain
    from .benchmarks.toyworlds.evaluate import evaluate_pipeline
    from .config import load_config, validate
    from .models.loading import load_pipeline, load_trained_pipeline, pipeline_call_defaults
    from .report import loss_curve, tag_bars, write_report
    from .synpic import SynPicConfig, run_synpic
    from .train import train

    quiet_libraries()
    t_start = time.time()
    from .objectives import OBJECTIVES

    online = OBJECTIVES.get(objective).source == "rollout"  # the policy samples its own groups: no Syn-Pic
    model = model or asset(rl[0] if rl else "toy-sd")
    judge = rl is not None and rewards is None  # the exact judge as reward (needs prompt metadata)
    if online:
        generators = []
    elif generators is None:  # the two toy models, plus the policy unguided as a source of clear losers
        generators = [asset("toy-sd"), asset("toy-sd3"), model]
        images_per_generator = [2, 2, 1] if images_per_generator is None else images_per_generator
        synpic_guidance = [guidance, guidance, 1.0] if synpic_guidance is None else synpic_guidance
    images_per_generator = 2 if images_per_generator is None else images_per_generator
    synpic_guidance = guidance if synpic_guidance is None else synpic_guidance
    rewards = rewards or [f"pickscore={asset('toy-clip-a')}", f"pickscore={asset('toy-clip-b')}"]

    run_dir = root / "run"
    ranked = root / "synpic"
    if judge:
        import diffalign.benchmarks.toyworlds.judge_reward  # noqa: F401  (registers shapes_judge)

        rewards = [f"shapes_partial={root / 'prompts.jsonl'}"]  # Flow-GRPO's dense GenEval-style reward
    if rl:
        data_ovs = [f"data.path={root / 'prompts.jsonl'}"]
        obj_ovs = [
            f"objective.rewards={','.join(rewards)}",
            f"objective.sample_steps={sample_steps}",
            f"objective.guidance_scale={guidance}",
            *rl[2],
        ]
    elif online:
        data_ovs = [f"data.path={root / 'prompts.txt'}"]
        obj_ovs = [
            f"objective.rewards={','.join(rewards)}",
            "objective.group_size=4",
            f"objective.sample_steps={sample_steps}",
            f"objective.guidance_scale={guidance}",
            "objective.ref_refresh_every=50",
        ]
    elif objective == "rankdpo":
        data_ovs, obj_ovs = [f"data.path={ranked}", "data.format=ranked"], []
    else:  # pair objectives train on best-vs-worst pairs
        data_ovs, obj_ovs = [f"data.path={root / 'pairs.parquet'}"], []
    if not online:  # the VAE and text encoder run once per image, not once per step (~1/7 of a step on CPU)
        data_ovs.append(f"data.cache_dir={root / 'cache'}")
    obj_ovs = [
        f"objective.name={objective}",
        *([f"objective.beta={beta}"] if objective != "sft" and beta is not None else []),
        *obj_ovs,
    ]
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            *data_ovs,
            "data.resolution=32",
            f"train.output_dir={run_dir}",
            f"train.max_steps={steps}",
            f"train.batch_size={batch_size}",
            f"train.lr={lr}",
            *obj_ovs,
            "lora.rank=8",
            f"train.seed={seed}",
            f"train.checkpoint_every={steps}",
            "train.warmup_steps=0",
            "train.lr_scheduler=constant",
        ],
    )
    validate(cfg, check_data=False)  # keys and hyperparameters, before any file or minute of generation
    if not online:
        from .synpic import per_generator, per_generator_counts

        ks = per_generator_counts(images_per_generator, len(generators))
        gs = per_generator(synpic_guidance, len(generators), "demo synpic_guidance", "scale")
    previous = [root / n for n in DEMO_OUTPUTS if (root / n).exists()]
    if previous and not overwrite:  # a rerun would reuse Syn-Pic images made by possibly other weights
        raise ConfigError(
            f"{root} holds a previous demo ({', '.join(p.name for p in previous)}); "
            "pass --out to another folder, or --overwrite to replace it"
        )
    for p in previous:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(train_prompts(n_train, seed)))
    if rl:  # GenEval metadata lines: the rollout prompts, and what the judge checks each image against
        from .benchmarks.geneval.metadata import shapes_prompts as metadata

        rows = metadata("train", n_train, seed)
        (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    if online:
        print(f"[1/4] Syn-Pic: skipped ({objective} samples {n_train} prompts with the policy as it trains)")
    else:
        parts = ", ".join(f"{k} from {Path(g).name} (guidance {s:g})" for g, k, s in zip(generators, ks, gs))
        print(f"[1/4] Syn-Pic: {n_train} prompts x ({parts}), {len(rewards)} rewards")
        run_synpic(
            SynPicConfig(
                prompts=str(root / "prompts.txt"),
                generators=generators,
                rewards=rewards,
                out=str(ranked),
                images_per_generator=images_per_generator,
                steps=sample_steps,
                guidance=synpic_guidance,
                seed=seed,
                shard_size=64,
                batch_prompts=32,
            )
        )
        if objective != "rankdpo":
            from .synpic import export_pairs

            export_pairs(ranked, root / "pairs.parquet")
        from .data.cache import build_cache

        build_cache(cfg)
    t_data = time.time()

    print(f"[2/4] {objective} with LoRA on {Path(model).name}: {steps} steps")
    train(cfg)
    t_train = time.time()

    n_distinct = len(shapes_prompts("heldout", n_eval, seed + 1000))
    short = f" (asked for {n_eval}: the held-out split has only {n_distinct})" if n_distinct < n_eval else ""
    print(
        f"[3/4] judged evaluation on {n_distinct} distinct held-out prompts{short} x {per_prompt} images, "
        "base vs aligned"
    )
    base, call_kw = load_pipeline(model)
    res_base = evaluate_pipeline(
        base, "heldout", n_eval, per_prompt, seed + 1000, sample_steps, guidance, **call_kw
    )
    aligned = load_trained_pipeline(run_dir)
    aligned.set_progress_bar_config(disable=True)
    res_al = evaluate_pipeline(
        aligned,
        "heldout",
        n_eval,
        per_prompt,
        seed + 1000,
        sample_steps,
        guidance,
        **pipeline_call_defaults(model),
    )
    diff = overall_gain(res_base["results"], res_al["results"])
    t_eval = time.time()

    print("[4/4] report")
    sb, sa = res_base["summary"], res_al["summary"]
    rep = root / "report"
    table = demo_table(sb, sa, diff)
    pairs, prompt_list = demo_samples(res_base, res_al, per_prompt, rep)
    # the rollout reward is logged by online objectives only (absent keys are left out)
    curve = loss_curve(run_dir / "metrics.jsonl", rep / "training.png", ("loss", "implicit_acc", "reward"))
    bars = tag_bars({"base": sb["per_tag"], "aligned": sa["per_tag"]}, rep / "per_tag.png")
    timing = {
        "synpic_s": t_data - t_start,
        "train_s": t_train - t_data,
        "eval_s": t_eval - t_train,
        "total_s": time.time() - t_start,
    }
    metrics = {
        "base": sb,
        "aligned": sa,
        "gain": diff,
        "timing": timing,
        "settings": {
            "model": model,
            "generators": generators,
            "rewards": rewards,
            "objective": objective,
            "beta": beta,
            "steps": steps,
            "lr": lr,
            "n_train": n_train,
            "n_eval": n_eval,
            "per_prompt": per_prompt,
            "sample_steps": sample_steps,
            "guidance": guidance,
            "seed": seed,
            "images_per_generator": images_per_generator,
            "synpic_guidance": synpic_guidance,
        },
    }
    write_report(
        rep,
        "diffalign demo: ShapesWorld alignment",
        table,
        [
            (
                "Base vs aligned samples",
                pairs,
                f"First image of the first {len(pairs)} held-out prompts: base (left) and aligned (right), "
                "same seed; the same images as two grids in base.png and aligned.png.",
            ),
            ("Per-tag accuracy", bars, "judged by the exact ShapesWorld detector with GenEval's rules"),
            (
                "Training curves",
                curve,
                f"{objective}, beta {beta if beta is not None else 'default'}, lr {lr}, {steps} steps",
            ),
            (f"Held-out prompts ({sb['n_prompts']} distinct)", None, prompt_list),
        ],
        metrics,
    )
    with (root / "results.jsonl").open("w") as f:
        for rb, ra in zip(res_base["results"], res_al["results"], strict=True):
            f.write(
                json.dumps(
                    {
                        "prompt": rb["prompt"],
                        "tag": rb["tag"],
                        "seed": rb["seed"],
                        "base": rb["correct"],
                        "aligned": ra["correct"],
                    }
                )
                + "\n"
            )
    print("\n" + table)
    print(f"\nreport: {rep / 'index.html'}  ({timing['total_s'] / 60:.1f} min)")
    return metrics


def demo_table(sb: dict[str, Any], sa: dict[str, Any], gain: dict[str, Any]) -> str:
    """The results table (markdown): per-tag and overall accuracy of base and aligned, distinct prompts
    and images per tag, and the gain with its paired cluster-bootstrap CI."""
    lines = ["| tag | base | aligned | prompts | images |", "|---|---|---|---|---|"]
    lines += [
        f"| {t} | {sb['per_tag'][t]:.3f} | {sa['per_tag'][t]:.3f} | {sb['n_prompts_per_tag'][t]} | "
        f"{sb['n_per_tag'][t]} |"
        for t in sb["per_tag"]
    ]
    lines += [
        f"| **overall** (95% CI) | {_with_ci(sb['overall'], sb['overall_ci95'])} "
        f"| {_with_ci(sa['overall'], sa['overall_ci95'])} | {sb['n_prompts']} | "
        f"{sum(sb['n_per_tag'].values())} |",
        "",
        f"gain: {_with_ci(gain['diff'], [gain['ci95_low'], gain['ci95_high']], '+.3f')} (95% paired "
        f"bootstrap CI, resampling the {gain['n_prompts']} distinct held-out prompts with all their images)",
    ]
    return "\n".join(lines)


def _with_ci(v: float, ci: list[float], fmt: str = ".3f") -> str:
    return f"{v:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def demo_samples(
    res_base: dict[str, Any], res_al: dict[str, Any], per_prompt: int, rep: Path, n: int = 16
) -> tuple[list[tuple[Path, str]], list[str]]:
    """Before/after pictures of the first image of the first ``n`` prompts, each captioned with its
    prompt (``pair_NN.png``; also as two grids, ``base.png`` and ``aligned.png``), and the list of
    every prompt with its tag and how many images of each model were judged correct."""
    import numpy as np

    from .report import image_grid, save_png

    rep.mkdir(parents=True, exist_ok=True)
    rb, ra = res_base["results"], res_al["results"]
    pick = list(range(0, min(n * per_prompt, len(rb)), per_prompt))
    save_png(image_grid(res_base["images"][pick], 8, scale=3), rep / "base.png")
    save_png(image_grid(res_al["images"][pick], 8, scale=3), rep / "aligned.png")

    def verdict(r: dict[str, Any]) -> str:
        return "correct" if r["correct"] else "wrong"

    pairs = []
    for c, j in enumerate(pick, start=1):
        pair = image_grid(np.stack([res_base["images"][j], res_al["images"][j]]), 2, scale=3)
        caption = f"{c}. {rb[j]['prompt']} (base {verdict(rb[j])}, aligned {verdict(ra[j])})"
        pairs.append((save_png(pair, rep / f"pair_{c:02d}.png"), caption))
    counts: dict[str, list[Any]] = {}
    for b, a in zip(rb, ra, strict=True):
        c = counts.setdefault(b["prompt"], [b["tag"], 0, 0, 0])
        c[1:] = [c[1] + bool(b["correct"]), c[2] + bool(a["correct"]), c[3] + 1]
    prompt_list = [
        f"{p} ({t}): base {nb}/{k}, aligned {na}/{k} correct" for p, (t, nb, na, k) in counts.items()
    ]
    return pairs, prompt_list
