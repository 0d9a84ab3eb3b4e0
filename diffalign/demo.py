"""``diffalign demo``: the whole training pipeline end to end on ShapesWorld, on a CPU, in ~2 minutes.

What it does (interim version; issue #3 replaces the freshly built model with the shipped,
pretrained toy models and evaluates generated images with the exact judge):

1. builds preference pairs from ShapesWorld: the winner is a render of the caption, the loser a
   render of a minimally different caption (wrong colour, count, relation, swapped attributes) —
   labels come from construction, never from the judge;
2. writes them as Pick-a-Pic style parquet and builds a tiny SD pipeline (random weights, the real
   diffusers classes, saved and reloaded with ``from_pretrained``);
3. trains Diffusion-DPO with LoRA through ``diffalign.train`` (the same loop as real runs);
4. reports, on held-out pairs with never-seen colour/shape combinations, the DPO implicit accuracy
   (does the policy prefer the correct image more than the reference does?) with a bootstrap CI.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch


def write_shapes_pairs(path: Path, n: int, seed: int, split: str, size: int = 32) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from .benchmarks.toyworlds.shapes import layout, make_dataset, perturb_metadata, render

    rng = np.random.default_rng([seed, 7])
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for img, caption, md in make_dataset(n, seed, split, size):  # type: ignore[arg-type]
        try:
            wrong, wsplit = perturb_metadata(md, rng, split), split  # type: ignore[arg-type]
        except ValueError:  # e.g. held-out counting prompts whose every perturbation is a train prompt
            wrong, wsplit = perturb_metadata(md, rng), "heldout"
        loser = render(layout(wrong, rng, wsplit), size)  # type: ignore[arg-type]
        enc = []
        for arr in (img, loser):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            enc.append(buf.getvalue())
        flip = bool(rng.integers(2))  # store the winner on either side, as Pick-a-Pic does
        rows["caption"].append(caption)
        rows["jpg_0"].append(enc[1] if flip else enc[0])
        rows["jpg_1"].append(enc[0] if flip else enc[1])
        rows["label_0"].append(0.0 if flip else 1.0)
        rows["label_1"].append(1.0 if flip else 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


@torch.no_grad()
def heldout_implicit_accuracy(run_dir: Path, model_path: Path, data: Path, draws: int = 4, seed: int = 1234) -> dict:
    """Mean DPO margin sign on held-out pairs, averaged over ``draws`` (noise, t) draws per pair."""
    from .config import DataConfig, ModelConfig
    from .data.pairs import PairDataset, collate, sample_seed
    from .models import load_adapter, load_trained_pipeline
    from .train.loop import group_errors, noised_inputs, prepare_batch

    adapter = load_adapter(ModelConfig(path=str(model_path)))
    policy = load_trained_pipeline(run_dir).unet
    ds = PairDataset(DataConfig(path=str(data), resolution=32), verbose=False)
    margins = []
    for i in range(len(ds)):
        batch = collate([ds[(i, sample_seed(seed, i * draws + d))] for d in range(draws)])
        x0, cond, micro = prepare_batch(adapter, batch, 2, adapter.device)
        x_t, t, target = noised_inputs(adapter, x0, batch["seed"])
        pe = group_errors(adapter, policy, x_t, t, target, cond, micro, 2)
        re = group_errors(adapter, adapter.denoiser, x_t, t, target, cond, micro, 2)
        margins.append(float(((re[:, 0] - pe[:, 0]) - (re[:, 1] - pe[:, 1])).mean()))
    m = np.array(margins)
    acc = (m > 0).astype(float)
    boot = np.random.default_rng(0).choice(acc, (2000, len(acc))).mean(1)
    return {"pairs": len(acc), "implicit_acc": float(acc.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}


def run_demo(out: str = "runs/demo", steps: int = 150, pairs: int = 256, seed: int = 0) -> dict:
    from ._quiet import quiet_libraries
    from .config import load_config
    from .models.tiny import build_tiny_pipeline
    from .train import train

    quiet_libraries()
    root = Path(out)
    print(f"[1/4] ShapesWorld pairs: {pairs} train, 128 held-out (unseen colour/shape combinations)")
    train_pq = write_shapes_pairs(root / "data" / "train.parquet", pairs, seed, "train")
    held_pq = write_shapes_pairs(root / "data" / "heldout.parquet", 128, seed + 1, "heldout")
    print("[2/4] tiny SD pipeline (random weights, real diffusers classes)")
    model = root / "model"
    build_tiny_pipeline("sd", model, seed=seed)
    print(f"[3/4] Diffusion-DPO with LoRA, {steps} steps")
    cfg = load_config(None, [f"model.path={model}", f"data.path={train_pq}", "data.resolution=32",
                             f"train.output_dir={root / 'run'}", f"train.max_steps={steps}", "train.batch_size=8",
                             "train.lr=1e-3", "objective.beta=500", "lora.rank=8", f"train.seed={seed}",
                             f"train.checkpoint_every={steps}"])
    last = train(cfg)
    print("[4/4] held-out implicit accuracy (policy vs reference)")
    res = heldout_implicit_accuracy(root / "run", model, held_pq)
    res["train_implicit_acc_last_step"] = last.get("implicit_acc")
    (root / "demo.json").write_text(json.dumps(res, indent=2))
    print(f"\n| split    | pairs | implicit accuracy | 95% CI |\n|----------|-------|-------------------|--------|\n"
          f"| held-out | {res['pairs']:5d} | {res['implicit_acc']:.3f}             | [{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] |")
    print(f"\nrun folder: {root / 'run'} (checkpoints, TensorBoard logs in tb/, metrics.jsonl); chance level is 0.5")
    return res
