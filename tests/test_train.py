"""End-to-end training on tiny saved pipelines: every family trains, checkpoints reload into a
diffusers pipeline, and the loop's invariants hold (accumulation, resume, cache, two processes)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError, load_config
from diffalign.train import train

from conftest import accelerate_launch

REPO = Path(__file__).resolve().parent.parent


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.lr=1e-2",
        "objective.beta=100",
        "train.checkpoint_every=100",
        *extra,
    ]


def run(model, data, out, *extra) -> dict:
    return train(load_config(None, overrides(model, data, out, *extra)))


def final_ckpt(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def trainable(out: Path) -> dict[str, torch.Tensor]:
    return load_file(final_ckpt(out) / "trainable.safetensors")


CASES = [("sd", "lora"), ("sdxl", "lora"), ("sd3", "lora"), ("sd", "full"), ("sd-v", "lora")]


@pytest.mark.parametrize("fam,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_train_family_end_to_end(tiny_models, pairs_parquet, tmp_path, fam, mode):
    from diffalign.models import load_trained_pipeline

    extra = ["lora.rank=0"] if mode == "full" else []
    if mode == "full":
        extra.append("train.lr=1e-3")
    init = tmp_path / "init"
    run(tiny_models[fam], pairs_parquet, init, "train.max_steps=1", "train.lr=0.0", *extra)
    out = tmp_path / "run"
    metrics = run(tiny_models[fam], pairs_parquet, out, "train.max_steps=3", "train.batch_size=2", *extra)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert {"loss", "implicit_acc", "err/policy_w", "err/ref_l", "margin", "grad_norm", "lr"} <= set(metrics)

    before, after = trainable(init), trainable(out)
    assert before.keys() == after.keys() and len(before) > 0
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"{len(unchanged)} trainable tensors did not change, e.g. {unchanged[:3]}"

    state = json.loads((final_ckpt(out) / "state.json").read_text())
    assert state["reference_unchanged"] and state["reference_mode"] == (
        "copy" if mode == "full" else "lora_off"
    )
    assert (out / "config.yaml").exists() and (out / "metrics.jsonl").read_text().count("\n") == 3
    assert list((out / "tb").rglob("events.out.tfevents*")), "TensorBoard events written"

    # the checkpoint loads back into a diffusers pipeline that samples an image
    pipe = load_trained_pipeline(out)
    gen = torch.Generator().manual_seed(0)
    img = pipe(
        ["a red circle"], num_inference_steps=2, height=32, width=32, output_type="pt", generator=gen
    ).images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    if mode == "lora":
        # with the adapters off the network is exactly the base model: training never touched it
        from diffalign.config import ModelConfig
        from diffalign.models import load_adapter

        base = load_adapter(ModelConfig(path=str(tiny_models[fam])))
        den = pipe.transformer if fam == "sd3" else pipe.unet
        x, t = torch.randn(1, 4, 4, 4), torch.tensor([500.0 if fam == "sd3" else 500])
        cond = base.encode_prompts(["a dog"])
        pipe.disable_lora()
        with torch.no_grad():
            assert torch.equal(base.predict(x, t, cond, model=den), base.predict(x, t, cond))
            pipe.enable_lora()
            assert not torch.allclose(base.predict(x, t, cond, model=den), base.predict(x, t, cond))


def test_sft_trains_without_reference(tiny_models, pairs_parquet, tmp_path):
    ovs = [
        o
        for o in overrides(
            tiny_models["sd"], pairs_parquet, tmp_path, "train.max_steps=2", "objective.name=sft"
        )
        if not o.startswith("objective.beta")
    ]
    m = train(load_config(None, ovs))
    assert "implicit_acc" not in m and m["loss"] > 0
    assert json.loads((final_ckpt(tmp_path) / "state.json").read_text())["reference_mode"] == "none"


def test_grad_accumulation_equivalence(tiny_models, pairs_parquet, tmp_path):
    """batch 4 x accum 1 == batch 1 x accum 4 after one optimizer step (fp32)."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(
        tiny_models["sd"],
        pairs_parquet,
        a,
        "train.max_steps=2",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.lr=1e-3",
    )
    run(
        tiny_models["sd"],
        pairs_parquet,
        b,
        "train.max_steps=2",
        "train.batch_size=1",
        "train.grad_accum=4",
        "train.lr=1e-3",
    )
    wa, wb = trainable(a), trainable(b)
    for n in wa:
        torch.testing.assert_close(wa[n], wb[n], atol=1e-5, rtol=0)


def test_dataloader_workers_give_the_same_run(tiny_models, pairs_parquet, tmp_path):
    """data.num_workers decodes/augments batches in worker processes; random flips and caption dropout
    are keyed by data position, so the run (reference pre-pass included) is the same as in-process."""
    common = [
        "train.max_steps=3",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.lr=1e-3",
        "data.random_flip=true",
        "data.caption_dropout=0.5",
        "train.precompute_reference=true",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_models["sd"], pairs_parquet, a, *common)
    run(tiny_models["sd"], pairs_parquet, b, *common, "data.num_workers=2")
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == 3 and lb == la
    wa, wb = trainable(a), trainable(b)
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


def test_resume_equals_uninterrupted(tiny_models, pairs_parquet, tmp_path):
    common = [
        "train.max_steps=5",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.warmup_steps=3",
        "train.ema_decay=0.9",
        "train.lr=1e-3",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    run(tiny_models["sd"], pairs_parquet, full, *common)
    halted = run(tiny_models["sd"], pairs_parquet, cut, *common, "train.halt_after_step=3")
    assert halted["halted_at"] == 3
    train(load_config(None, overrides(tiny_models["sd"], pairs_parquet, cut, *common)), resume="latest")
    wf, wc = trainable(full), trainable(cut)
    for n in wf:
        torch.testing.assert_close(wf[n], wc[n], atol=1e-6, rtol=0)
    ef = load_file(final_ckpt(full) / "ema.safetensors")
    ec = load_file(final_ckpt(cut) / "ema.safetensors")
    for n in ef:
        torch.testing.assert_close(ef[n], ec[n], atol=1e-6, rtol=0)
    # the per-step losses after the resume point match too
    lf = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    lc = [json.loads(x)["loss"] for x in (cut / "metrics.jsonl").read_text().splitlines()]
    assert lc == pytest.approx(lf, abs=1e-6)
    # starting again without --resume in a folder that holds a run is refused
    # (checkpoints and metrics would mix)
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoint step-000005\).*--resume"):
        run(tiny_models["sd"], pairs_parquet, full, *common)


def test_cached_latents_give_the_same_loss(tiny_models, pairs_parquet, tmp_path):
    from diffalign.data.cache import build_cache

    cache = tmp_path / "cache"
    cfg = load_config(
        None, overrides(tiny_models["sd"], pairs_parquet, tmp_path / "x", f"data.cache_dir={cache}")
    )
    build_cache(cfg, shard_size=3)
    assert len(list(cache.glob("shard-*.safetensors"))) == 3
    m_cached = run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "c",
        "train.max_steps=2",
        "train.batch_size=2",
        f"data.cache_dir={cache}",
        "data.caption_dropout=0.3",
    )
    m_plain = run(
        tiny_models["sd"],
        pairs_parquet,
        tmp_path / "p",
        "train.max_steps=2",
        "train.batch_size=2",
        "data.caption_dropout=0.3",
    )
    for k in ("loss", "err/policy_w", "err/ref_l"):
        assert m_cached[k] == pytest.approx(m_plain[k], rel=1e-5, abs=1e-7), k
    # the margin is beta/2 (= 50) times a difference of errors, so fp32 rounding (VAE run at another
    # batch composition) is amplified 50x: ~1e-7 on the errors is ~5e-6 here
    assert m_cached["margin"] == pytest.approx(m_plain["margin"], abs=2e-5)
    # a cache of other data is refused, not silently used
    from diffalign.config import ConfigError

    other = tmp_path / "other.parquet"
    from conftest import make_pairs_parquet

    make_pairs_parquet(other, n=5, seed=1)
    with pytest.raises(ConfigError, match="is stale"):
        run(tiny_models["sd"], other, tmp_path / "o", "train.max_steps=1", f"data.cache_dir={cache}")


# ``diffalign train`` with every destroy_process_group call recorded: how many DDP models are alive
# then (one would hold the gloo group; its deallocation can then hang the exit: engines.release_process_group)
RECORD_DESTROY = """\
import gc, json, os, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

real = dist.destroy_process_group


def destroy(*args, **kwargs):
    live = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    with open(os.path.join(sys.argv[1], "destroy-" + os.environ["RANK"] + ".jsonl"), "a") as fh:
        fh.write(json.dumps({"live_ddp": live}) + "\\n")
    return real(*args, **kwargs)


dist.destroy_process_group = destroy
from diffalign.cli import main

sys.exit(main(["train", *sys.argv[2:]]))
"""


def test_two_processes_stay_in_sync_and_match_one(tiny_models, pairs_parquet, tmp_path):
    """accelerate launch --num_processes 2 (CPU, gloo) equals one process at the same global batch;
    each process destroys its process group once, after the run's DDP model is gone."""
    one, two = tmp_path / "one", tmp_path / "two"
    run(
        tiny_models["sd"],
        pairs_parquet,
        one,
        "train.max_steps=2",
        "train.batch_size=1",
        "train.grad_accum=4",
        "train.lr=1e-3",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    script = tmp_path / "record_destroy.py"
    script.write_text(RECORD_DESTROY)
    cmd = [
        *accelerate_launch(),
        str(script),
        str(tmp_path),
        str(cfg),
        *overrides(
            tiny_models["sd"],
            pairs_parquet,
            two,
            "train.max_steps=2",
            "train.batch_size=1",
            "train.grad_accum=2",
            "train.lr=1e-3",
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((final_ckpt(two) / "state.json").read_text())
    assert state["world_size"] == 2 and state["ranks_in_sync"] is True
    w1, w2 = trainable(one), trainable(two)
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], atol=1e-5, rtol=0)
    for rank in (0, 1):
        calls = (tmp_path / f"destroy-{rank}.jsonl").read_text().splitlines()
        assert [json.loads(c) for c in calls] == [{"live_ddp": 0}], (rank, calls)


def test_bf16_gradient_checkpointing_and_ema_export(tiny_models, pairs_parquet, tmp_path):
    """bf16 autocast with an fp32 LoRA on a bf16 base, checkpointed activations, EMA export."""
    from diffalign.models import load_trained_pipeline

    m = run(
        tiny_models["sdxl"],
        pairs_parquet,
        tmp_path,
        "train.max_steps=2",
        "train.mixed_precision=bf16",
        "train.gradient_checkpointing=true",
        "train.ema_decay=0.5",
    )
    assert torch.isfinite(torch.tensor(m["loss"]))
    ck = final_ckpt(tmp_path)
    live, ema = load_file(ck / "trainable.safetensors"), load_file(ck / "ema.safetensors")
    assert all(v.dtype == torch.float32 for v in live.values())
    assert any(not torch.equal(live[n], ema[n]) for n in live)  # the export holds the EMA weights
    pipe = load_trained_pipeline(tmp_path)
    lora_b = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    ema_b = {n: v for n, v in ema.items() if "lora_B" in n}
    assert sorted(float(v.detach().abs().sum()) for v in lora_b.values()) == pytest.approx(
        sorted(float(v.abs().sum()) for v in ema_b.values()), rel=1e-5
    )


def test_dcpo_uses_per_image_captions(tiny_models, tmp_path):
    """DCPO on dual-caption data: the loser's own caption changes the loss (vs. DPO on the same pairs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import make_pairs_parquet

    p = make_pairs_parquet(tmp_path / "p.parquet", n=4, labels=[1.0, 0.0, 1.0, 0.0])
    t = pq.read_table(p)
    t = t.append_column("caption_0", pa.array(["a red circle"] * 4)).append_column(
        "caption_1", pa.array(["a blue dog"] * 4)
    )
    pq.write_table(t, p)
    from diffalign.config import DataConfig
    from diffalign.data import PairDataset

    ds = PairDataset(DataConfig(path=str(p), resolution=32))
    assert ds[(0, 0)]["captions"] == ["a red circle", "a blue dog"]
    assert ds[(1, 0)]["captions"] == ["a blue dog", "a red circle"]  # label_0 == 0: swapped with the images
    common = ["train.max_steps=1", "train.batch_size=4", "train.lr=0.0"]
    dcpo = run(tiny_models["sd"], p, tmp_path / "dcpo", *common, "objective.name=dcpo")
    dpo = run(tiny_models["sd"], p, tmp_path / "dpo", *common)
    assert dcpo["err/ref_l"] != pytest.approx(dpo["err/ref_l"], rel=1e-6)
