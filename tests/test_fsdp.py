"""FSDP2 on CPU: ``accelerate launch --config_file configs/accelerate/fsdp_cpu2.yaml`` (2 gloo
processes) really shards the denoiser (its trainable parameters are DTensors holding half the
elements on each process), equals one process at the same global batch, resumes exactly after
``kill -9``, and writes consolidated checkpoints and exports that plain diffusers loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import ConfigError
from diffalign.train import engines
from diffalign.train.engines import engine_from_launch

from conftest import accelerate_launch

REPO = Path(__file__).resolve().parent.parent
FSDP2 = REPO / "configs/accelerate/fsdp_cpu2.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# One process accumulates 4 micro-batches of 1; two FSDP processes accumulate 2 each and average the
# reduce-scattered gradients: the same sums in another order, so fp32 weights agree to float noise,
# 1e-5 after 2 AdamW steps at lr 1e-3 (LoRA: ~3e-6 at most), as DDP's test. The exception: AdamW
# moves an entry by about lr * g / (|g| + eps) per step, so where a gradient entry is itself at float
# noise (~1e-8, seen in full fine-tuning: 1 entry in 4608) the step can differ by up to 2 lr; such
# entries may be at most 0.1% and within 2 lr per step.
ATOL = 1e-5


def overrides(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.lr=1e-3",
        "objective.beta=100",
        "train.checkpoint_every=100",
        *extra,
    ]


def launch(config: Path, tmp_path: Path, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("")
    cmd = [*accelerate_launch(config), "-m", "diffalign.cli", "train", str(cfg), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def final_ckpt(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def weights(out: Path, name: str = "trainable.safetensors") -> dict[str, torch.Tensor]:
    return load_file(final_ckpt(out) / name)


# ----------------------------------------------------------------------------- engine choice


def test_engine_is_what_the_launch_asked_for():
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}
    assert engine_from_launch(fsdp) == engines.Engine("fsdp2", 2, True)
    no_reshard = engine_from_launch({**fsdp, "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert no_reshard.reshard_after_forward is False
    assert engine_from_launch({"WORLD_SIZE": "2"}).name == "ddp"
    assert engine_from_launch({}).name == "single"
    # refused, never replaced by another engine
    with pytest.raises(ConfigError, match="fsdp_version: 1.*FSDP2 only"):
        engine_from_launch({**fsdp, "FSDP_VERSION": "1"})
    with pytest.raises(ConfigError, match="num_processes 1 has nothing to shard"):
        engine_from_launch({**fsdp, "WORLD_SIZE": "1"})
    if not torch.cuda.is_available():  # accelerate would silently train DDP on CPUs
        with pytest.raises(ConfigError, match="DEEPSPEED needs CUDA"):
            engine_from_launch({"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"})


WORKER = """
from accelerate import Accelerator
from diffalign.train.engines import any_process
acc = Accelerator(cpu=True)
print("stop", any_process(acc.process_index == 1, acc), any_process(False, acc), flush=True)
"""


def test_a_clock_decision_taken_by_one_process_stops_them_all(tmp_path):
    """``train.max_minutes`` is read from each process's clock; when only rank 1 is out of time, both
    ranks must stop (a rank going on alone waits in its next collective for ever)."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    cmd = [*accelerate_launch(), str(worker)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(ln for ln in proc.stdout.splitlines() if ln.startswith("stop")) == ["stop True False"] * 2


def test_main_process_only_forwards_are_refused_under_fsdp(tiny_models, pairs_parquet, tmp_path):
    """Sampling grids and the over-optimisation guard run the denoiser on the main process alone,
    which would wait forever for the other processes' all-gathers."""
    from diffalign.config import load_config

    cfg = load_config(None, overrides(tiny_models["sd"], pairs_parquet, tmp_path, "train.sample_prompts=[a]"))
    with pytest.raises(ConfigError, match="train.sample_prompts: runs the denoiser on the main process"):
        engines.check_fsdp_config(cfg)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux", "wan", "qwenimage"])
def test_wrap_units_per_family(tiny_models, family):
    """Every block of the family's block lists becomes a unit, and the units hold most parameters
    (the root keeps embeddings, norms and projections)."""
    from diffalign.models.tiny import build_tiny_pipeline

    if family in tiny_models:
        from diffalign.config import ModelConfig
        from diffalign.models import load_adapter

        den = load_adapter(ModelConfig(path=str(tiny_models[family]))).denoiser
    else:
        pipe = build_tiny_pipeline(family)
        den = getattr(pipe, "transformer", None) or pipe.unet
    units = engines.wrap_units(den, family)
    in_units = sum(p.numel() for u in units for p in u.parameters())
    assert len(units) >= 2 and in_units > 0.5 * sum(p.numel() for p in den.parameters())
    with pytest.raises(ConfigError, match="no wrap policy for family 'nope'"):
        engines.wrap_units(den, "nope")


# ----------------------------------------------------------------------------- two processes


CASES = [("sd", "lora"), ("sd", "full"), ("sd3", "lora"), ("sd3", "full")]


@pytest.mark.parametrize("fam,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_fsdp_two_processes_shard_and_match_one(tiny_models, pairs_parquet, tmp_path, fam, mode):
    from diffalign.config import load_config
    from diffalign.train import train

    extra = ["train.max_steps=2", "train.batch_size=1", *(["lora.rank=0"] if mode == "full" else [])]
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, overrides(tiny_models[fam], pairs_parquet, one, *extra, "train.grad_accum=4")))
    proc = launch(
        FSDP2, tmp_path, overrides(tiny_models[fam], pairs_parquet, two, *extra, "train.grad_accum=2")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine: fsdp2 (torch fully_shard, 2 processes on cpu" in proc.stdout

    # sharded during training: the live trainable parameters at the checkpoint were DTensors, each
    # process holding about half of the elements (plain DDP would record Parameter and all of them)
    state = json.loads((final_ckpt(two) / "state.json").read_text())
    assert state["engine"] == "fsdp2" and state["world_size"] == 2 and state["ranks_in_sync"] is True
    layout = state["parameters"]
    assert layout["type"] == "DTensor" and layout["placements"] == ["S(0)"], layout
    assert layout["local_numel"] <= 0.6 * layout["numel"], layout
    assert state["reference_mode"] == ("copy" if mode == "full" else "lora_off")

    # consolidated checkpoint: the same tensors as one process, within float noise
    w1, w2 = weights(one), weights(two)
    assert w1.keys() == w2.keys() and len(w1) > 0
    assert_close_up_to_adam_flips(w1, w2, lr=1e-3, steps=2)
    o1 = torch.load(final_ckpt(one) / "optimizer.pt", weights_only=True)
    o2 = torch.load(final_ckpt(two) / "optimizer.pt", weights_only=True)
    assert o1["state"].keys() == o2["state"].keys()
    for i in o1["state"]:  # the first moments are gradient averages: no Adam normalisation
        torch.testing.assert_close(o2["state"][i]["exp_avg"], o1["state"][i]["exp_avg"], atol=ATOL, rtol=0)

    # the consolidated export has the single-process export's files and tensors, and plain diffusers
    # loads it: a LoRA that changes the network's output, or a full denoiser with the trained weights
    e1, e2 = final_ckpt(one) / "export", final_ckpt(two) / "export"
    files = sorted(str(p.relative_to(e1)) for p in e1.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(e2)) for p in e2.rglob("*") if p.is_file())
    for f in (f for f in files if f.endswith(".safetensors")):
        a, b = load_file(e1 / f), load_file(e2 / f)
        assert a.keys() == b.keys() and len(a) > 0
        assert_close_up_to_adam_flips(a, b, lr=1e-3, steps=2)
    check_export_loads(tiny_models[fam], e2, fam, mode, w2)


def assert_close_up_to_adam_flips(a: dict, b: dict, lr: float, steps: int) -> None:
    diffs = torch.cat([(a[n] - b[n]).abs().flatten() for n in a])
    assert (diffs > ATOL).float().mean() <= 1e-3 and diffs.max() <= 2 * lr * steps, (
        f"{int((diffs > ATOL).sum())} of {diffs.numel()} entries differ by > {ATOL}, max {diffs.max()}"
    )


def check_export_loads(model: Path, export: Path, fam: str, mode: str, trained: dict[str, torch.Tensor]):
    from diffalign.models.loading import load_pipeline  # diffusers' from_pretrained (no T5 for tiny SD3)

    pipe, _ = load_pipeline(str(model), "cpu")
    den = pipe.transformer if fam == "sd3" else pipe.unet
    if mode == "full":
        loaded = type(den).from_pretrained(str(export / ("transformer" if fam == "sd3" else "unet")))
        sd = loaded.state_dict()
        assert all(torch.equal(sd[n], trained[n]) for n in trained)
        return
    c = den.config
    x = torch.randn(1, c.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    if fam == "sd3":
        kw = {
            "encoder_hidden_states": torch.randn(1, 8, c.joint_attention_dim),
            "pooled_projections": torch.randn(1, c.pooled_projection_dim),
        }
    else:
        kw = {"encoder_hidden_states": torch.randn(1, 8, c.cross_attention_dim)}
    with torch.no_grad():
        before = den(x, timestep=torch.tensor([500]), **kw, return_dict=False)[0]
        pipe.load_lora_weights(str(export))
        after = den(x, timestep=torch.tensor([500]), **kw, return_dict=False)[0]
    lora_b = [n for n in trained if "lora_B" in n]
    assert lora_b and any(trained[n].abs().sum() > 0 for n in lora_b)  # non-empty, trained adapters
    assert not torch.allclose(before, after)  # the loaded LoRA takes part in the forward


# ----------------------------------------------------------------------------- bf16


BF16 = [("sd", "lora"), ("sd3", "full")]


@pytest.mark.parametrize("fam,mode", BF16, ids=[f"{f}-{m}" for f, m in BF16])
def test_fsdp_bf16_trains_exports_fp32_and_resumes_exactly(tiny_models, pairs_parquet, tmp_path, fam, mode):
    """train.mixed_precision=bf16 under FSDP2 (parameters all-gathered and computed in bf16,
    gradients reduce-scattered in fp32 into fp32 master weights; a LoRA's frozen base is bf16): the
    loss is finite and the weights move, checkpoint and export are fp32 and load in plain diffusers,
    and a run stopped after step 1 and resumed ends bit for bit where the uninterrupted run does.
    grad_accum=1 with the LoRA-off reference is the case FSDP once got wrong (its first forward, the
    reference's, ran with the adapters' requires_grad cleared, and bf16 gradients reached fp32
    parameters). Not compared with one process: bf16 rounds differently there (autocast casts fp32
    weights per matmul), a difference Adam amplifies to its 2 lr per step bound."""
    model = tiny_models[fam]
    common = [
        "train.max_steps=3",
        "train.batch_size=1",
        "train.grad_accum=1",
        "train.mixed_precision=bf16",
        "train.keep_checkpoints=10",
        *(["lora.rank=0"] if mode == "full" else []),
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = launch(FSDP2, tmp_path, overrides(model, pairs_parquet, ref, *common))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16 compute, fp32 gradient reduction and master weights" in done.stdout
    state = json.loads((final_ckpt(ref) / "state.json").read_text())
    assert state["engine"] == "fsdp2" and state["parameters"]["type"] == "DTensor"
    assert state["ranks_in_sync"] is True and state["bad_steps"] == 0
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)

    trained = weights(ref)
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    if mode == "lora":  # lora_B starts at zero
        assert all(trained[n].abs().sum() > 0 for n in trained if "lora_B" in n)
    else:
        init = load_file(next((model / "transformer").glob("*.safetensors")))
        moved = sum(not torch.equal(trained[n], init[n].float()) for n in trained)
        assert moved > 0.9 * len(trained), f"{moved} of {len(trained)} tensors changed"
    export = final_ckpt(ref) / "export"
    files = sorted(export.rglob("*.safetensors"))
    assert files and all(v.dtype == torch.float32 for f in files for v in load_file(f).values())
    check_export_loads(model, export, fam, mode, trained)

    # stopped after step 1 (its checkpoint), resumed: the uninterrupted run's files, bit for bit
    halted = launch(FSDP2, tmp_path, overrides(model, pairs_parquet, cut, *common, "train.halt_after_step=1"))
    assert halted.returncode == 0, halted.stderr[-3000:]
    assert [p.name for p in (cut / "checkpoints").glob("step-*")] == ["step-000001"]
    resumed = launch(FSDP2, tmp_path, [*overrides(model, pairs_parquet, cut, *common), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a, b = weights(ref), weights(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(final_ckpt(ref) / "optimizer.pt", weights_only=True)
    ob = torch.load(final_ckpt(cut) / "optimizer.pt", weights_only=True)
    for i in oa["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa["state"][i][key], ob["state"][i][key]), (i, key)
    assert (ref / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()
    for f in files:
        other = final_ckpt(cut) / "export" / f.relative_to(export)
        ea, eb = load_file(f), load_file(other)
        assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


# ----------------------------------------------------------------------------- kill -9 and resume


def test_fsdp_killed_three_times_equals_uninterrupted(tiny_models, pairs_parquet, tmp_path):
    """The whole launch (launcher and both workers, one process group) is SIGKILLed as soon as a new
    checkpoint appears, three times; the resumed runs end with the uninterrupted FSDP run's weights,
    optimizer state, EMA and metrics, bit for bit."""
    common = [
        "train.max_steps=6",
        "train.batch_size=1",
        "train.grad_accum=2",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=10",
        "train.ema_decay=0.9",
        "train.warmup_steps=2",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    done = launch(FSDP2, tmp_path, overrides(tiny_models["sd"], pairs_parquet, ref, *common))
    assert done.returncode == 0, done.stderr[-3000:]

    def progress() -> int:
        return len([p for p in (cut / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")])

    cfg = tmp_path / "c.yaml"
    base = accelerate_launch(FSDP2)
    first = [
        *base,
        "-m",
        "diffalign.cli",
        "train",
        str(cfg),
        *overrides(tiny_models["sd"], pairs_parquet, cut, *common),
    ]
    killed = 0
    for i in range(3):
        have = progress()
        proc = subprocess.Popen(
            first if i == 0 else [*first, "--resume"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=ENV,
            start_new_session=True,  # its own process group: the kill takes the workers too
        )
        deadline = time.time() + 240
        while time.time() < deadline and progress() <= have and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(0.05 * i)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        time.sleep(0.5)  # the killed workers' gloo sockets and the run lock are released
    assert killed >= 2
    done = launch(FSDP2, tmp_path, [*overrides(tiny_models["sd"], pairs_parquet, cut, *common), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("trainable.safetensors", "ema.safetensors"):
        a, b = weights(ref, name), weights(cut, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    oa = torch.load(final_ckpt(ref) / "optimizer.pt", weights_only=True)
    ob = torch.load(final_ckpt(cut) / "optimizer.pt", weights_only=True)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    assert (ref / "metrics.jsonl").read_text() == (cut / "metrics.jsonl").read_text()


# ----------------------------------------------------------------------------- online


def test_fsdp_two_processes_equal_one_for_flow_grpo(tiny_models, tiny_clip, tmp_path):
    """The online path under FSDP2: rollouts sample with the sharded policy on both processes (the
    same number of forwards each, so their all-gathers pair up) and give the one-process groups;
    bounds as the DDP test's (tests/test_online_rl.py), Adam's sign steps on float-noise gradients."""
    from test_online_rl import metrics, rl_cfg

    from diffalign.config import dump_config
    from diffalign.train import train

    prompts = tmp_path / "prompts.txt"
    lines = ["a red circle", "a blue square", "two green triangles", "a yellow circle above a red square"]
    prompts.write_text("\n".join(lines) + "\n")
    args = ["train.max_steps=2", "objective.clip_range=1e-2", "train.lr=3e-2", "objective.beta=0.04"]
    one, two = tmp_path / "one", tmp_path / "two"
    extra_one = ("train.batch_size=2", "train.grad_accum=2")
    train(rl_cfg("flow_grpo", tiny_models["sd3"], prompts, tiny_clip, one, *args, *extra_one))
    dump_config(
        rl_cfg("flow_grpo", tiny_models["sd3"], prompts, tiny_clip, two, *args, "train.batch_size=1"),
        tmp_path / "two.yaml",
    )
    cmd = accelerate_launch(FSDP2)
    proc = subprocess.run(
        [*cmd, "-m", "diffalign.cli", "train", str(tmp_path / "two.yaml")],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((final_ckpt(two) / "state.json").read_text())
    assert state["engine"] == "fsdp2" and state["parameters"]["type"] == "DTensor"
    m1, m2 = metrics(one), metrics(two)
    for key in ("reward", "loss", "ratio", "kl", "advantage", "clipfrac"):  # step 1: the same groups
        assert m1[0][key] == pytest.approx(m2[0][key], rel=1e-5, abs=1e-7), key
    assert m1[1]["reward"] == pytest.approx(m2[1]["reward"], rel=1e-4)
    w1, w2 = weights(one), weights(two)
    diffs = torch.cat([(w1[n] - w2[n]).abs().flatten() for n in w1])
    assert (diffs <= 1e-5).float().mean() > 0.9 and diffs.max() <= 2 * 3e-2 * 2
