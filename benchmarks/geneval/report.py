"""The eval report: markdown, a self-contained HTML page and JSON (via :mod:`diffalign.report`).

Sections: per-tag accuracy bars; one image grid per tag (first image of up to ``per_tag`` prompts;
with two models, model A's row above model B's, so each column is a before/after pair; a green
frame marks an image judged correct, red one judged wrong); for reward-only prompt sets a sample
grid; per reward a histogram of both models' scores and, with two models, of the per-prompt win
rates. ``metrics.json`` holds the whole summary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...report import image_grid, save_png, tag_bars, write_report
from .settings import sampling_line

GREEN, RED = (40, 170, 60), (215, 40, 40)


def _thumb(path: Path, size: int, frame: tuple[int, int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.LANCZOS)
        arr = np.asarray(im).copy()
    if frame is not None:
        b = max(1, size // 24)
        arr[:b], arr[-b:], arr[:, :b], arr[:, -b:] = frame, frame, frame, frame
    return arr


def _thumb_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return min(128, min(im.size))


def _fmt_ci(v: float, ci: Sequence[float], signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(v)} [{f.format(ci[0])}, {f.format(ci[1])}]"


def _geneval_table(out: Mapping[str, Any]) -> list[str]:
    labels = list(out["models"])
    geneval = {lb: out["models"][lb]["geneval"] for lb in labels}
    tags = list(geneval[labels[0]]["per_tag"])
    head = ["tag", *[f"{lb} ({Path(out['models'][lb]['path']).name})" for lb in labels]]
    if "difference" in out:
        head.append("compare - model")
    head += ["prompts", "images"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tags:
        cells = [t] + [_fmt_ci(geneval[lb]["per_tag"][t], geneval[lb]["per_tag_ci95"][t]) for lb in labels]
        if "difference" in out:
            d = out["difference"]
            cells.append(_fmt_ci(d["per_tag"][t], d["per_tag_ci95"][t], signed=True))
        cells += [str(geneval[labels[0]]["n_prompts_per_tag"][t]), str(geneval[labels[0]]["n_per_tag"][t])]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**overall**"] + [_fmt_ci(geneval[lb]["overall"], geneval[lb]["overall_ci95"]) for lb in labels]
    if "difference" in out:
        cells.append(_fmt_ci(out["difference"]["overall"], out["difference"]["overall_ci95"], signed=True))
    cells += [str(geneval[labels[0]]["n_prompts"]), str(sum(geneval[labels[0]]["n_per_tag"].values()))]
    lines.append("| " + " | ".join(cells) + " |")
    return lines


def _reward_table(out: Mapping[str, Any]) -> list[str]:
    labels = list(out["models"])
    head = ["reward", *[f"{lb} mean / median" for lb in labels]]
    wins = out.get("win_rates", {})
    if wins:
        head += ["win rate of compare: mean", "median", "prompts won/tied/lost"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, per_model in out["rewards"].items():
        cells = [key] + [
            f"{per_model[lb]['mean']:.4g} [{per_model[lb]['mean_ci95'][0]:.4g}, "
            f"{per_model[lb]['mean_ci95'][1]:.4g}] / {per_model[lb]['median']:.4g}"
            for lb in labels
        ]
        if key in wins:
            w = wins[key]
            cells += [
                _fmt_ci(w["win_rate_mean"], w["win_rate_mean_ci95"]),
                _fmt_ci(w["win_rate_median"], w["win_rate_median_ci95"]),
                f"{w['prompts_won']}/{w['prompts_tied']}/{w['prompts_lost']}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def reward_histogram(scores: Mapping[str, Sequence[Sequence[float]]], title: str, out: Path) -> Path:
    """Overlaid histograms of each model's image scores (``scores[label]`` = per-prompt lists)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat = {lb: np.concatenate([np.asarray(s, dtype=float) for s in v]) for lb, v in scores.items()}
    allv = np.concatenate(list(flat.values()))
    lo, hi = float(allv.min()), float(allv.max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
    fig, ax = plt.subplots(figsize=(5, 3))
    for lb, v in flat.items():
        ax.hist(v, bins=bins, alpha=0.55, label=f"{lb} (median {np.median(v):.3g})")
        ax.axvline(float(np.median(v)), ls="--", lw=1, color=ax.patches[-1].get_facecolor()[:3])
    ax.set_xlabel(title)
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def win_rate_histogram(
    a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], title: str, out: Path, pairing: str = "all"
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .winrate import per_prompt_win_rates

    rates = per_prompt_win_rates(a, b, pairing)  # type: ignore[arg-type]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(rates, bins=np.linspace(0, 1, 11), color="tab:green", alpha=0.8)
    ax.axvline(0.5, color="k", lw=1)
    ax.axvline(float(rates.mean()), color="tab:red", ls="--", lw=1, label=f"mean {rates.mean():.3f}")
    ax.set_xlabel(f"per-prompt win rate of compare ({title})")
    ax.set_ylabel("prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def build_report(
    root: Path,
    out: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    results: Mapping[str, Sequence[Mapping[str, Any]]],
    reward_scores: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    per_prompt: int,
    per_tag: int = 8,
) -> Path:
    """Write ``root/report/{report.md,index.html,metrics.json,*.png}``; returns the HTML path."""
    rep = root / "report"
    rep.mkdir(parents=True, exist_ok=True)
    labels = list(out["models"])
    models = "; ".join(f"{lb} = {out['models'][lb]['path']}" for lb in labels)
    table: list[str] = [
        f"Prompt set: {out['prompt_set']}. Models: {models}. {per_prompt} image(s) per prompt.",
        "",
        f"Sampling: {sampling_line(out['sampling'])}.",
        "",
    ]
    sections: list[tuple[str, Path | None, str | list[str]]] = []
    first = rows and (root / labels[0] / "00000" / "samples" / "00000.png")
    size = _thumb_size(first) if first and first.is_file() else 64
    scale = max(1, 96 // size)
    pair_text = (
        " Each column is one prompt: top row model, bottom row compare (same seed)."
        if len(labels) > 1
        else ""
    )

    if out.get("judged"):
        table += _geneval_table(out)
        table += [
            "",
            "Accuracy per tag and overall (mean of the tag accuracies, GenEval's headline score), 95% "
            "cluster-bootstrap CIs: distinct prompts resampled within tags, each with all its images.",
        ]
        bars = tag_bars({lb: out["models"][lb]["geneval"]["per_tag"] for lb in labels}, rep / "per_tag.png")
        sections.append(("Per-tag accuracy", bars, "GenEval rules on the detector's output; " + models))
        correct = {lb: {(r["prompt_index"], r["sample"]): r["correct"] for r in results[lb]} for lb in labels}
        tags = list(out["models"][labels[0]]["geneval"]["per_tag"])
        sections.append(
            (
                "Samples per tag",
                None,
                f"First image of up to {per_tag} prompts per tag, one column each, the prompts listed in "
                f"column order; green frame = judged correct, red = wrong.{pair_text}",
            )
        )
        for tag in tags:
            idx = [i for i, r in enumerate(rows) if r["tag"] == tag][:per_tag]
            thumbs = [
                _thumb(
                    root / lb / f"{i:05d}" / "samples" / "00000.png",
                    size,
                    GREEN if correct[lb][(i, 0)] else RED,
                )
                for lb in labels
                for i in idx
            ]
            grid = save_png(image_grid(np.stack(thumbs), len(idx), scale=scale), rep / f"grid_{tag}.png")
            marks = [
                f"{rows[i]['prompt']} ("
                + ", ".join(f"{lb} {'correct' if correct[lb][(i, 0)] else 'wrong'}" for lb in labels)
                + ")"
                for i in idx
            ]
            sections.append((f"{tag}: samples", grid, marks))
    else:
        idx = list(range(min(per_tag * 2, len(rows))))
        thumbs = [
            _thumb(root / lb / f"{i:05d}" / "samples" / "00000.png", size, None) for lb in labels for i in idx
        ]
        grid = save_png(image_grid(np.stack(thumbs), len(idx), scale=scale), rep / "samples.png")
        sections.append(
            (
                "Samples",
                None,
                f"First image of the first {len(idx)} prompts, listed in column order.{pair_text}",
            )
        )
        sections.append(("Sample prompts", grid, [str(rows[i]["prompt"]) for i in idx]))

    if out.get("rewards"):
        table += [
            "",
            "Rewards (mean with 95% CI over prompts, median)"
            + (
                "; win rate = fraction of head-to-head comparisons per prompt won by compare (ties 1/2), "
                "mean and median over prompts"
                if out.get("win_rates")
                else ""
            )
            + ":",
            "",
        ]
        table += _reward_table(out)
        for n, (key, per_model) in enumerate(reward_scores.items()):
            hist = reward_histogram(per_model, key, rep / f"reward_{n}.png")
            sections.append(
                (f"Reward distribution: {key}", hist, "Image scores per model; dashed lines: medians.")
            )
            if key in out.get("win_rates", {}):
                wr = win_rate_histogram(
                    per_model["model"],
                    per_model["compare"],
                    key,
                    rep / f"winrate_{n}.png",
                    out["win_rates"][key]["pairing"],
                )
                sections.append(
                    (f"Win rates: {key}", wr, "Per-prompt win rate of compare over model; 0.5 = even.")
                )
    return write_report(rep, "diffalign eval", "\n".join(table), sections, dict(out))
