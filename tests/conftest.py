from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "DIFFALIGN_CACHE_HOME" not in os.environ:  # data.cache_dir=auto caches go to a folder of this session
    import tempfile

    os.environ["DIFFALIGN_CACHE_HOME"] = tempfile.mkdtemp(prefix="diffalign-cache-")

CPU2 = Path(__file__).resolve().parent.parent / "configs/accelerate/cpu2.yaml"  # 2 CPU processes (gloo)


def accelerate_launch(config: Path = CPU2) -> list[str]:
    """``accelerate launch --config_file CONFIG`` with this interpreter: the prefix of every
    multi-process test's command (append ``-m diffalign.cli train CFG`` or a script)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def make_pairs_parquet(
    path: Path,
    n: int = 8,
    size: int = 32,
    seed: int = 0,
    labels: list | None = None,
    captions: list | None = None,
    corrupt_rows: tuple[int, ...] = (),
    drop_columns: tuple[str, ...] = (),
) -> Path:
    """A small Pick-a-Pic v2 style parquet: caption, jpg_0, jpg_1, label_0, label_1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    words = ["a red circle", "a blue square", "a photo of a dog", "two green triangles"]
    for i in range(n):
        a = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        b = (rng.random((size + 8 * (i % 2), size, 3)) * 255).astype(
            np.uint8
        )  # loser of another size sometimes
        lab = labels[i] if labels is not None else float(i % 2)
        rows["caption"].append(captions[i] if captions is not None else words[i % len(words)])
        rows["jpg_0"].append(b"not an image" if i in corrupt_rows else _png(a))
        rows["jpg_1"].append(_png(b))
        rows["label_0"].append(lab)
        rows["label_1"].append(1.0 - lab if isinstance(lab, float) else lab)
    for c in drop_columns:
        rows.pop(c)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=4)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved pipelines of every family (built once per test session)."""
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for fam in ("sd", "sdxl", "sd3"):
        build_tiny_pipeline(fam, root / fam)
        out[fam] = root / fam
    build_tiny_pipeline("sd", root / "sd-v", prediction_type="v_prediction")
    out["sd-v"] = root / "sd-v"
    return out


@pytest.fixture(scope="session")
def pairs_parquet(tmp_path_factory) -> Path:
    return make_pairs_parquet(tmp_path_factory.mktemp("data") / "pairs.parquet", n=8)


def build_tiny_clip(out: Path, seed: int = 0) -> Path:
    """A random-weight CLIPModel of the real architecture, shrunk, saved like a hub checkpoint."""
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel

    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(WORDS)
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.eos_token_id,
        },
        vision_config={
            "image_size": 30,
            "patch_size": 6,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 30},
                "crop_size": {"height": 30, "width": 30},
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_resize": True,
                "do_center_crop": True,
                "do_normalize": True,
                "resample": 3,
                "do_rescale": True,
                "rescale_factor": 1 / 255,
            }
        )
    )
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def tiny_train_config(model: Path, data: Path, out: Path, *extra: str):
    """A few-step training config on a tiny pipeline: 32 px, lr 1e-2, beta 100 (not for SFT, which
    has none), a checkpoint every step; ``extra`` overrides come last and win."""
    from diffalign.config import load_config

    beta = [] if "objective.name=sft" in extra else ["objective.beta=100"]
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.path={data}",
            f"train.output_dir={out}",
            "data.resolution=32",
            "train.lr=1e-2",
            *beta,
            "train.checkpoint_every=1",
            *extra,
        ],
    )


def newest_weights(out: Path) -> dict:
    """The trainable tensors of a run folder's newest complete checkpoint."""
    from safetensors.torch import load_file

    done = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    return load_file(done[-1] / "trainable.safetensors")


def tb_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of the TensorBoard event files in ``folder`` as TensorBoard shows them
    (purged steps dropped, the last write of a step wins); wall-clock ``time/`` tags left out (they
    differ between any two runs)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        t: sorted({e.step: e.value for e in acc.Scalars(t)}.items())
        for t in acc.Tags()["scalars"]
        if not t.startswith("time/")
    }


def chromium_screenshot_cmd(url: str, shot: Path) -> list[str]:
    """Debian's headless Chromium taking a screenshot of ``url`` with no network or profile state."""
    import tempfile

    return [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tempfile.mkdtemp()}",
        f"--screenshot={shot}",
        "--window-size=1100,1400",
        "--enable-logging=stderr",
        url,
    ]
