"""The 2025-26 flow families end to end (issue #22): tiny SD3.5-M, FLUX.1-dev/schnell, Wan2.1 and
Qwen-Image pipelines built from configs train DPO and RankDPO with LoRA and with full fine-tuning
through ``diffalign train``, save, reload with ``from_pretrained`` / ``load_lora_weights`` and
sample; plain diffusers (diffalign never imported) loads the exported LoRA; precomputed reference
errors are bit-identical to a live reference; ``diffalign tiny`` builds every family."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffalign.cli import main

NEW = ["sd35", "flux", "flux-schnell", "wan", "qwenimage"]
FAMILY = {"sd35": "sd3", "flux": "flux", "flux-schnell": "flux", "wan": "wan", "qwenimage": "qwenimage"}
PIPELINE = {
    "sd35": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux-schnell": "FluxPipeline",
    "wan": "WanPipeline",
    "qwenimage": "QwenImagePipeline",
}
FRAMES = 5  # Wan clips: 1 + 4k frames


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny saved pipelines of the new families, built through ``diffalign tiny``."""
    root = tmp_path_factory.mktemp("tiny-dit")
    for name in NEW:
        assert main(["tiny", name, str(root / name)]) == 0
    return {name: root / name for name in NEW}


def _media(rng: np.random.Generator, video: bool) -> bytes:
    from PIL import Image

    from diffalign.data.media import encode_video

    if video:
        return encode_video((rng.random((FRAMES, 32, 32, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_data(path: Path, video: bool, ranked: bool, n: int = 4) -> Path:
    """Pairs (Pick-a-Pic columns) or a ranked set of k = 3 (Syn-Pic columns), images or 5-frame clips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    captions = ["a red circle", "a blue square", "a photo of a dog", "two green triangles"]
    if ranked:
        rows: dict[str, list] = {"prompt": [], "images": [], "phi": [], "rank": []}
        for i in range(n):
            rows["prompt"].append(captions[i % 4])
            rows["images"].append([_media(rng, video) for _ in range(3)])
            rows["phi"].append([1.0, 0.0, 0.5] if i % 2 else [0.0, 0.5, 1.0])
            rows["rank"].append([1, 3, 2] if i % 2 else [3, 2, 1])
    else:
        rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
        for i in range(n):
            rows["caption"].append(captions[i % 4])
            rows["jpg_0"].append(_media(rng, video))
            rows["jpg_1"].append(_media(rng, video))
            rows["label_0"].append(float(i % 2))
            rows["label_1"].append(1.0 - float(i % 2))
    pq.write_table(pa.table(rows), path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        (video, ranked): make_data(
            root / f"{'v' if video else 'i'}{'r' if ranked else 'p'}.parquet", video, ranked
        )
        for video in (False, True)
        for ranked in (False, True)
    }


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """``diffalign train`` arguments: the tiny recipe as key=value overrides of an empty YAML."""
    config = out.parent / "empty.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}\n")
    return [
        "train",
        str(config),
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.lr=1e-2",
        "objective.beta=100",
        "train.checkpoint_every=2",
        "train.report_to=none",
        *extra,
    ]


CASES = [
    ("sd35", "diffusion_dpo", "lora"),
    ("sd35", "rankdpo", "full"),
    ("flux", "diffusion_dpo", "lora"),
    ("flux", "rankdpo", "lora"),
    ("flux", "diffusion_dpo", "full"),
    ("flux-schnell", "rankdpo", "full"),
    ("wan", "diffusion_dpo", "lora"),
    ("wan", "rankdpo", "full"),
    ("qwenimage", "rankdpo", "lora"),
    ("qwenimage", "diffusion_dpo", "full"),
]


@pytest.mark.parametrize("name,objective,mode", CASES, ids=["-".join(c) for c in CASES])
def test_trains_saves_reloads_and_samples(models, data, tmp_path, name, objective, mode):
    from diffalign.models import load_trained_pipeline

    video, ranked = name == "wan", objective == "rankdpo"
    extra = [f"objective.name={objective}", *(["data.format=ranked"] if ranked else [])]
    if mode == "full":
        extra += ["lora.rank=0", "train.lr=1e-3"]
    out = tmp_path / "run"
    assert main(train_args(models[name], data[(video, ranked)], out, *extra)) == 0

    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["family"] == FAMILY[name] and state["reference_unchanged"]
    assert state["reference_mode"] == ("copy" if mode == "full" else "lora_off")
    assert all(np.isfinite(v) for v in state["metrics"].values())
    weights = load_file(ckpt / "trainable.safetensors")
    assert weights and (mode == "full") == (not any("lora" in n for n in weights))
    export = ckpt / "export"
    if mode == "lora":
        assert (export / "pytorch_lora_weights.safetensors").is_file()  # diffusers' own LoRA format
    else:
        assert (export / "transformer" / "config.json").is_file()

    # reloads as a plain diffusers pipeline (load_lora_weights, or the exported transformer) and samples
    pipe = load_trained_pipeline(out)
    assert type(pipe).__name__ == PIPELINE[name]
    kw = {"num_frames": FRAMES} if video else {}
    gen = torch.Generator().manual_seed(0)
    result = pipe(
        ["a red circle"],
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=16,
        output_type="pt" if not video else "np",
        generator=gen,
        **kw,
    )
    media = torch.as_tensor(np.asarray(result.frames)) if video else result.images
    assert media.shape == ((1, FRAMES, 32, 32, 3) if video else (1, 3, 32, 32))
    assert torch.isfinite(media).all()
    if mode == "full":  # the reloaded transformer holds the trained weights
        den = pipe.transformer.state_dict()
        n = next(iter(weights))
        assert torch.equal(den[n], weights[n])


PLAIN_DIFFUSERS = """
import json, sys, diffusers, torch
from safetensors.torch import load_file
for line in sys.stdin.read().splitlines():
    cls, model, export = line.split("\\t")
    index = json.load(open(model + "/model_index.json"))
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}  # SD3: no T5
    pipe = getattr(diffusers, cls).from_pretrained(model, **absent)
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    pipe.load_lora_weights(export)
    lora = [n for n, _ in pipe.transformer.named_parameters() if "lora_" in n]
    saved = load_file(export + "/pytorch_lora_weights.safetensors")
    assert len(lora) == len(saved) > 0, (cls, len(lora), len(saved))
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters() if n in before)
    print(cls, len(lora))
assert not any(m.startswith("diffalign") for m in sys.modules), "diffalign was imported"
"""


def test_plain_diffusers_loads_the_exported_lora(models, data, tmp_path):
    """The LoRA export of every new family loads with ``pipe.load_lora_weights`` in a process that
    never imports diffalign: every saved tensor becomes a LoRA parameter of the transformer."""
    lines = []
    for name in ["sd35", "flux", "wan", "qwenimage"]:
        out = tmp_path / name
        video = name == "wan"
        assert main(train_args(models[name], data[(video, False)], out, "train.max_steps=1")) == 0
        ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
        lines.append(f"{PIPELINE[name]}\t{models[name]}\t{ckpt / 'export'}")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_DIFFUSERS],
        input="\n".join(lines),
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line.split()[0] for line in proc.stdout.splitlines()] == [
        PIPELINE[n] for n in ["sd35", "flux", "wan", "qwenimage"]
    ]


@pytest.mark.parametrize("name", ["sd35", "flux", "wan", "qwenimage"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_precomputed_reference_is_bit_identical(models, data, monkeypatch, tmp_path, name, mode):
    """The pre-pass's reference errors equal the live reference's bit for bit, and so do the losses."""
    import diffalign.train.loop as loop
    from diffalign.config import load_config
    from diffalign.train import train

    if not hasattr(loop, "group_errors"):  # the batch code moved out of the loop
        import diffalign.train.sources as loop
    seen: dict[str, list[torch.Tensor]] = {"live": [], "pre": []}
    group_errors = loop.group_errors
    extra = ["train.grad_accum=2", *(["lora.rank=0", "train.lr=1e-3"] if mode == "full" else [])]
    for key, more in (("live", []), ("pre", ["train.precompute_reference=true"])):

        def recording(*args, _key=key, **kwargs):
            err = group_errors(*args, **kwargs)
            if torch.is_inference_mode_enabled():  # the pre-pass and the live reference, never the policy
                seen[_key].append(err.clone())
            return err

        monkeypatch.setattr(loop, "group_errors", recording)
        args = train_args(models[name], data[(name == "wan", False)], tmp_path / key, *extra, *more)[2:]
        train(load_config(None, args))
        monkeypatch.undo()
    assert len(seen["live"]) == len(seen["pre"]) == 2 * 2  # one per (step, micro-batch)
    assert all(torch.equal(a, b) for a, b in zip(seen["live"], seen["pre"], strict=True))
    losses = [
        [json.loads(r)["loss"] for r in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
        for k in ("live", "pre")
    ]
    assert losses[0] == losses[1]


def test_tiny_builds_every_family(tmp_path):
    """``diffalign tiny`` offers every family (and the SD3.5 / schnell variants); each folder is a
    diffusers pipeline of the right class that diffalign detects from ``model_index.json``."""
    from diffalign.cli import TINY_CHOICES
    from diffalign.config import ModelConfig
    from diffalign.models.loading import PIPELINE_FAMILIES, resolve_family
    from diffalign.models.tiny import TINY_NAMES

    assert TINY_CHOICES == TINY_NAMES
    assert set(PIPELINE_FAMILIES.values()) <= {FAMILY.get(n, n) for n in TINY_NAMES}
    for name in ["animatediff", "text2video", "audioldm"]:  # the others are built by the fixture
        assert main(["tiny", name, str(tmp_path / name)]) == 0
        assert resolve_family(ModelConfig(path=str(tmp_path / name))) == name


@pytest.mark.parametrize("name", NEW)
def test_family_detected_from_model_index(models, name):
    from diffalign.config import ModelConfig
    from diffalign.models.loading import resolve_family

    index = json.loads((models[name] / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE[name]
    assert resolve_family(ModelConfig(path=str(models[name]))) == FAMILY[name]
