"""Toy video and audio alignment benchmark: base vs DPO vs RankDPO, judged exactly.

    python -m diffalign.benchmarks.toyworlds.av_bench video --out runs/av-video
    python -m diffalign.benchmarks.toyworlds.av_bench audio --out runs/av-audio
    python -m diffalign.benchmarks.toyworlds.av_bench audio --out runs/av-audio --seed 0 1 2
        # one run per seed + a table

The same pipeline as ``diffalign demo``, on clips instead of images:

1. Syn-Pic (``diffalign synpic``): train-split prompts x ``k`` samples of the base model, scored by
   the world's toy reward (``video_clip`` on toy-video-clip, ``clap`` on toy-clap), ranked;
   best-vs-worst pairs exported for DPO. The judge never labels training data.
2. Each objective with LoRA on the base model, the same data, steps and seed.
3. Base and every aligned model sample the same held-out prompts with the same seeds; the world's
   judge (``video.judge_clip`` / ``tones.judge_audio``) decides each clip; overall = mean of
   per-tag accuracies with stratified bootstrap CIs and paired bootstrap CIs on the gains.
4. A report: per-tag table, video strips + GIFs or spectrograms + playable WAVs, loss curves.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ...synpic import PairsMode


@dataclass(frozen=True)
class World:
    name: str
    base: str
    """Name of the shipped base model (an asset folder)."""
    reward: str
    prompts: Callable[[str, int, int], list[dict[str, Any]]]
    judge: Callable[[np.ndarray, dict[str, Any]], tuple[bool, str]]


def world(name: str) -> World:
    from ...demo import asset

    if name == "video":
        from . import video

        return World(
            "video", "toy-video", f"video_clip={asset('toy-video-clip')}", video.prompts, video.judge_clip
        )
    if name == "audio":
        from . import tones

        return World("audio", "toy-audio", f"clap={asset('toy-clap')}", tones.prompts, tones.judge_audio)
    raise ValueError(f"unknown world {name!r}; valid choices: video, audio")


def unique_prompts(w: World, split: str, n: int, seed: int) -> list[str]:
    seen: dict[str, None] = {}
    for md in w.prompts(split, 40 * n, seed):
        seen.setdefault(md["prompt"], None)
        if len(seen) == n:
            break
    return list(seen)


def evaluate_av(
    pipe: Any,
    w: World,
    split: str = "heldout",
    n_prompts: int = 60,
    per_prompt: int = 4,
    seed: int = 0,
    steps: int = 15,
    guidance: float = 4.0,
    batch: int = 32,
    **call_kw: Any,
) -> dict[str, Any]:
    """Judged evaluation with fixed per-sample seeds; same output layout as ``evaluate.evaluate_pipeline``."""
    from tqdm.auto import tqdm

    from ...models.generate import generate_media
    from ...synpic import image_seed
    from ..geneval.rules import summarize
    from ..geneval.stats import overall_ci as bootstrap_ci

    metas = w.prompts(split, n_prompts, seed)
    seeds = [image_seed(seed, i, j) for i in range(len(metas)) for j in range(per_prompt)]
    media: list[np.ndarray] = []
    per_batch = max(1, batch // per_prompt)
    for b in tqdm(range(0, len(metas), per_batch), desc=f"generate {w.name}", unit="batch", leave=False):
        chunk = metas[b : b + per_batch]
        media += generate_media(
            pipe,
            [m["prompt"] for m in chunk],
            per_prompt,
            seeds[b * per_prompt : (b + len(chunk)) * per_prompt],
            steps,
            guidance,
            **call_kw,
        )
    results = []
    for k, x in enumerate(media):
        md = metas[k // per_prompt]
        ok, reason = w.judge(x, md)
        results.append(
            {"tag": md["tag"], "prompt": md["prompt"], "seed": seeds[k], "correct": ok, "reason": reason}
        )
    summary = summarize(results)
    summary["overall_ci95"] = bootstrap_ci(results)
    return {"summary": summary, "results": results, "media": np.stack(media)}


def _gain_cell(g: dict[str, float]) -> str:
    return f"{g['diff']:+.3f} [{g['ci95_low']:+.3f}, {g['ci95_high']:+.3f}]"


def _table(names: Sequence[str], res: dict[str, dict[str, Any]], gains: dict[str, dict[str, float]]) -> str:
    tags = sorted(res[names[0]]["summary"]["per_tag"])
    lines = ["| tag | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for t in tags:
        lines.append(f"| {t} | " + " | ".join(f"{res[n]['summary']['per_tag'][t]:.3f}" for n in names) + " |")
    lines.append(
        "| **overall** | "
        + " | ".join(
            f"{res[n]['summary']['overall']:.3f} [{res[n]['summary']['overall_ci95'][0]:.3f}, "
            f"{res[n]['summary']['overall_ci95'][1]:.3f}]"
            for n in names
        )
        + " |"
    )
    if len(names) > 1:  # one model alone has nothing to compare with
        lines.append("| gain vs base | – | " + " | ".join(_gain_cell(gains[n]) for n in names[1:]) + " |")
    return "\n".join(lines)


def evaluate_and_report(
    w: World,
    models: dict[str, str],
    rep: Path,
    split: str = "heldout",
    n_eval: int = 60,
    per_prompt: int = 4,
    seed: int = 1000,
    steps: int = 15,
    guidance: float = 4.0,
    extra_sections: Sequence[tuple[str, Any, str]] = (),
    write: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Judge every model (label -> pipeline folder, hub id or diffalign run) on the same prompts and
    seeds; the first label is the baseline of the paired differences. Media and plots go to ``rep``;
    per-clip verdicts go to ``results.jsonl``; with ``write`` the report (markdown + HTML) too.
    ``device``: default CUDA when there is one (per-sample seeds are CPU generators either way)."""
    from ...data.media import encode_audio
    from ...models.loading import default_device
    from ...report import save_gif, save_png, spectrogram_png, tag_bars, video_strips, write_report
    from ..geneval.generation import load_model
    from ..geneval.stats import overall_gain as paired_difference

    device = default_device(device)
    rep.mkdir(parents=True, exist_ok=True)
    res = {}
    for label, spec in models.items():
        pipe, call_kw = load_model(spec, device)
        pipe.set_progress_bar_config(disable=True)
        res[label] = evaluate_av(pipe, w, split, n_eval, per_prompt, seed, steps, guidance, **call_kw)
    names = list(models)
    gains = {n: paired_difference(res[names[0]]["results"], res[n]["results"]) for n in names[1:]}
    table = _table(names, res, gains)
    pick = list(range(0, min(8 * per_prompt, len(res[names[0]]["results"])), per_prompt))
    shown = "; ".join(f"{i + 1}: {res[names[0]]['results'][j]['prompt']}" for i, j in enumerate(pick))
    sections: list[tuple[str, Any, str]] = []
    for n in names:
        m = res[n]["media"][pick]
        verdicts = ", ".join("ok" if res[n]["results"][j]["correct"] else "x" for j in pick)
        if w.name == "video":
            strip = save_png(video_strips(m, scale=2), rep / f"{n}_strips.png")
            gifs = [save_gif(m[i], rep / f"{n}_{i + 1}.gif") for i in range(min(4, len(m)))]
            sections.append(
                (f"{n}: clips", [strip, *gifs], f"one row per prompt ({shown}); judge: {verdicts}")
            )
        else:
            from .tones import SR

            spec_png = spectrogram_png(
                m, [f"{i + 1}" for i in range(len(m))], SR, rep / f"{n}_spectrograms.png"
            )
            wavs = []
            for i in range(min(4, len(m))):
                (rep / f"{n}_{i + 1}.wav").write_bytes(encode_audio(m[i], SR))
                wavs.append(rep / f"{n}_{i + 1}.wav")
            sections.append((f"{n}: clips", [spec_png, *wavs], f"prompts {shown}; judge: {verdicts}"))
    sections.append(
        (
            "Per-tag accuracy",
            tag_bars({n: res[n]["summary"]["per_tag"] for n in names}, rep / "per_tag.png"),
            f"judged exactly ({w.name} world judge)",
        )
    )
    sections += list(extra_sections)
    metrics = {n: res[n]["summary"] for n in names} | {"gains": gains, "models": models}
    with (rep / "results.jsonl").open("w") as f:  # per-clip verdicts, for pooling or re-analysis later
        for n in names:
            for r in res[n]["results"]:
                f.write(json.dumps({"model": n, **r}) + "\n")
    if write:
        write_report(rep, f"diffalign toy {w.name} evaluation", table, sections, metrics)
    return {"results": res, "gains": gains, "table": table, "sections": sections, "metrics": metrics}


def run_av_bench(
    name: str,
    out: str,
    objectives: Sequence[str] = ("diffusion_dpo", "rankdpo"),
    base: str | None = None,
    reward: str | None = None,
    n_train: int = 40,
    k: int = 16,
    steps: int = 100,
    beta: float = 2000.0,
    lr: float = 1e-3,
    batch_size: int = 8,
    n_eval: int = 60,
    per_prompt: int = 8,
    sample_steps: int = 15,
    guidance: float = 4.0,
    seed: int = 0,
    pairs_mode: PairsMode = "best_worst",
    pairs_n: int = 1,
) -> dict[str, Any]:
    from ..._quiet import quiet_libraries
    from ...config import load_config
    from ...report import (
        loss_curve,
        write_report,
    )
    from ...synpic import SynPicConfig, check_pairs_mode, export_pairs, run_synpic
    from ...train import train

    quiet_libraries()
    check_pairs_mode(pairs_mode, pairs_n)  # before minutes of Syn-Pic
    from ...demo import asset

    w = world(name)
    base = base or asset(w.base)  # the shipped base model, when there is one
    reward = reward or w.reward
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float] = {}
    t0 = time.time()
    (root / "prompts.txt").write_text("\n".join(unique_prompts(w, "train", n_train, seed)))
    print(
        f"[1/4] Syn-Pic: {n_train} {name} prompts x {k} samples "
        f"of {Path(base).name}, reward {reward.split('=')[0]}"
    )
    ranked = run_synpic(
        SynPicConfig(
            prompts=str(root / "prompts.txt"),
            generators=[base],
            rewards=[reward],
            out=str(root / "synpic"),
            images_per_generator=k,
            steps=sample_steps,
            guidance=guidance,
            seed=seed,
            shard_size=64,
            batch_prompts=8,
        )
    )
    pairs = export_pairs(
        ranked, root / "pairs.parquet", pairs_mode, pairs_n
    )  # DPO's pairs; RankDPO reads the ranked sets
    timing["synpic_s"] = time.time() - t0
    runs: dict[str, Path] = {}
    for obj in objectives:
        t1 = time.time()
        print(f"[2/4] {obj} with LoRA: {steps} steps x {batch_size}")
        data = [f"data.path={ranked}", "data.format=ranked"] if obj == "rankdpo" else [f"data.path={pairs}"]
        run_dir = root / f"run-{obj}"
        cfg = load_config(
            None,
            [
                f"model.path={base}",
                *data,
                "data.resolution=32",
                "data.random_flip=false",
                f"train.output_dir={run_dir}",
                f"train.max_steps={steps}",
                f"train.batch_size={batch_size}",
                f"train.lr={lr}",
                f"objective.name={obj}",
                f"objective.beta={beta}",
                "lora.rank=8",
                f"train.seed={seed}",
                f"train.checkpoint_every={steps}",
                "train.warmup_steps=0",
                "train.lr_scheduler=constant",
            ],
        )
        train(cfg)
        runs[obj] = run_dir
        timing[f"train_{obj}_s"] = time.time() - t1
    print(f"[3/4] judged evaluation: {n_eval} held-out prompts x {per_prompt} samples per model")
    t2 = time.time()
    models = {"base": base} | {obj: str(run_dir) for obj, run_dir in runs.items()}
    rep = root / "report"
    rep.mkdir(parents=True, exist_ok=True)
    ev = evaluate_and_report(
        w,
        models,
        rep,
        "heldout",
        n_eval,
        per_prompt,
        seed + 1000,
        sample_steps,
        guidance,
        extra_sections=[
            (f"Training: {obj}", loss_curve(run_dir / "metrics.jsonl", rep / f"training_{obj}.png"), "")
            for obj, run_dir in runs.items()
        ],
        write=False,
    )
    res, gains, table, sections = ev["results"], ev["gains"], ev["table"], ev["sections"]
    names = list(models)
    timing["eval_s"] = time.time() - t2
    print("[4/4] report")
    timing["total_s"] = time.time() - t0
    metrics = {n: res[n]["summary"] for n in names} | {
        "gains": gains,
        "timing": timing,
        "settings": {
            "world": name,
            "base": base,
            "reward": reward,
            "objectives": list(objectives),
            "n_train": n_train,
            "k": k,
            "steps": steps,
            "beta": beta,
            "lr": lr,
            "batch_size": batch_size,
            "n_eval": n_eval,
            "per_prompt": per_prompt,
            "sample_steps": sample_steps,
            "guidance": guidance,
            "seed": seed,
            "pairs_mode": pairs_mode,
            "pairs_n": pairs_n,
        },
    }
    write_report(rep, f"diffalign toy {name} alignment", table, sections, metrics)
    (root / "results.json").write_text(json.dumps(metrics, indent=2, default=str))
    print("\n" + table)
    print("\ntimes: " + ", ".join(f"{k_} {v / 60:.1f} min" for k_, v in timing.items()))
    print(f"report: {rep / 'index.html'}")
    return metrics


def summarize_seeds(per_seed: dict[int, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """One table over independent runs (``seed -> run_av_bench metrics``): each seed's base score and
    gains, then per objective the mean gain, its range and how many runs' CIs lie above zero.

    A single run's CI covers only evaluation noise (clip seeds) for one trained model; which clips
    Syn-Pic drew and the training noise can move the gain more than that (RESULTS.md, toy audio),
    so a claim should hold across seeds."""
    seeds = sorted(per_seed)
    objs = list(per_seed[seeds[0]]["gains"])
    lines = [
        "| seed | base | " + " | ".join(f"{o} gain [95% CI]" for o in objs) + " |",
        "|---" * (len(objs) + 2) + "|",
    ]
    for sd in seeds:
        g = per_seed[sd]["gains"]
        lines.append(
            f"| {sd} | {per_seed[sd]['base']['overall']:.3f} | "
            + " | ".join(_gain_cell(g[o]) for o in objs)
            + " |"
        )
    summary: dict[str, Any] = {}
    for o in objs:
        d = np.array([per_seed[sd]["gains"][o]["diff"] for sd in seeds])
        summary[o] = {
            "mean": float(d.mean()),
            "min": float(d.min()),
            "max": float(d.max()),
            "above_zero": sum(per_seed[sd]["gains"][o]["ci95_low"] > 0 for sd in seeds),
            "below_zero": sum(per_seed[sd]["gains"][o]["ci95_high"] < 0 for sd in seeds),
            "runs": len(seeds),
        }
    lines.append(
        "| **mean (range)** | – | "
        + " | ".join(
            f"{summary[o]['mean']:+.3f} ({summary[o]['min']:+.3f} to {summary[o]['max']:+.3f})" for o in objs
        )
        + " |"
    )
    lines.append(
        "| CI above / below zero | – | "
        + " | ".join(f"{summary[o]['above_zero']} / {summary[o]['below_zero']} of {len(seeds)}" for o in objs)
        + " |"
    )
    return "\n".join(lines), summary


def main(argv: list[str] | None = None) -> None:
    import inspect

    from ...synpic import PAIRS_MODES

    default = {
        k: v.default for k, v in inspect.signature(run_av_bench).parameters.items()
    }  # one place for defaults
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("world", choices=["video", "audio"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--base", default=None)
    ap.add_argument("--reward", default=None)
    ap.add_argument("--objectives", nargs="+", default=list(default["objectives"]))
    ap.add_argument(
        "--pairs",
        default=default["pairs_mode"],
        choices=PAIRS_MODES,
        help="DPO pairs per prompt: best vs worst of the k "
        "ranked samples, or every pair with different scores",
    )
    ap.add_argument(
        "--pairs-n",
        type=int,
        default=default["pairs_n"],
        help="best_worst: each of the n best against each of the n worst",
    )
    for name in ("n_train", "k", "steps", "batch_size", "n_eval", "per_prompt", "sample_steps"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=default[name])
    ap.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[default["seed"]],
        help="several seeds: one full run each under OUT/seed-S, then a table over the runs (OUT/seeds.md)",
    )
    for name in ("beta", "lr", "guidance"):
        ap.add_argument("--" + name, type=float, default=default[name])
    a = ap.parse_args(argv)
    out = Path(a.out or f"runs/av-{a.world}")
    if len(set(a.seed)) != len(a.seed):
        ap.error(f"--seed {' '.join(map(str, a.seed))}: a seed is listed twice")
    per_seed = {}
    for sd in a.seed:
        per_seed[sd] = run_av_bench(
            a.world,
            str(out if len(a.seed) == 1 else out / f"seed-{sd}"),
            a.objectives,
            a.base,
            a.reward,
            a.n_train,
            a.k,
            a.steps,
            a.beta,
            a.lr,
            a.batch_size,
            a.n_eval,
            a.per_prompt,
            a.sample_steps,
            a.guidance,
            sd,
            a.pairs,
            a.pairs_n,
        )
    if len(a.seed) > 1:
        table, summary = summarize_seeds(per_seed)
        (out / "seeds.md").write_text(f"# diffalign toy {a.world} alignment over seeds {a.seed}\n\n{table}\n")
        (out / "seeds.json").write_text(json.dumps(summary, indent=2))
        print(f"\nover seeds {a.seed}:\n{table}\n({out / 'seeds.md'})")


if __name__ == "__main__":
    main()
