"""benchmarks/perf/peer_grpo_bench.py: the parts that need no peer tree (bar parsing, the two configs
describing one run, the peer's config file and stand-ins, stopping a trainer that never ends)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from diffalign.benchmarks.perf import peer_grpo_bench as pg


def _bar(desc: str, n: int, total: int) -> str:
    return f"{desc}: {100 * n // total:3d}%|##        | {n}/{total} [00:01<00:02,  1.00it/s]"


def test_peer_rounds_are_closed_training_bars_only():
    text = "\r".join(
        [
            _bar("Epoch 0: sampling", 4, 4),  # sampling bars, inner timestep bars: ignored
            "\x1b[A" + _bar("Timestep", 3, 3),
            _bar("Epoch 0.0: training", 3, 4),
            "\x1b[A" + _bar("Epoch 0.0: training", 4, 4),  # tqdm's cursor escapes before the bar
            _bar("Epoch 0.0: training", 4, 4) + "\n",  # the closing print repeats it: counted once
            _bar("Epoch 1: sampling", 4, 4),
            _bar("Epoch 1.0: training", 2, 4),
        ]
    )
    assert pg.peer_rounds(text) == [0]
    assert pg.peer_rounds(text + "\r" + _bar("Epoch 1.0: training", 4, 4)) == [0, 1]
    assert pg.peer_rounds(_bar("Epoch 12.0: training", 4, 4)) == [12]


def test_diffalign_rounds_end_at_every_updates_th_step():
    d = pg.DIFFALIGN_BAR
    text = "\r".join(_bar(d, n, 6) for n in range(7)) + "\r" + _bar(d, 3, 6)  # set_postfix repeats
    assert pg.diffalign_rounds(text, updates=2) == [0, 1, 2]
    assert pg.diffalign_rounds(text, updates=3) == [0, 1]
    assert pg.diffalign_rounds(_bar(d, 1, 6), updates=2) == []


def test_run_rates_from_round_stamps():
    stamps = [(0, 10.0, 5.0), (1, 12.0, 7.0), (2, 14.0, 9.0), (3, 16.0, 11.0)]
    r = pg.Run("diffalign", 0, wall_s=17.0, peak_rss_kib=2**20, stamps=stamps)
    assert r.steady_images_per_s(16) == pytest.approx(3 * 16 / 6.0)
    assert r.cpu_s_per_image(16) == pytest.approx(6.0 / (3 * 16))
    assert r.end_to_end_images_per_s(16) == pytest.approx(4 * 16 / 17.0)
    assert r.to_last_round_images_per_s(16) == pytest.approx(4 * 16 / 16.0)
    assert r.exit_s() == pytest.approx(1.0) and r.first_round_s() == 10.0
    one = pg.Run("peer", 0, 5.0, 1, [(0, 5.0, 1.0)])
    assert one.steady_images_per_s(16) != one.steady_images_per_s(16)  # nan: one round


def test_yaml_float_stays_a_float():
    for x in [1e-4, 3e-4, 1e-5, 4.5, 0.0, 5, 1e-12, 2.5e7]:
        s = pg.yaml_float(x)
        assert isinstance(yaml.safe_load(s), float) and yaml.safe_load(s) == pytest.approx(float(x)), s


def test_settings_shapes():
    s = pg.Settings(64, prompts=8, group=8, chunk=8, updates=2)
    assert (s.images_per_round, s.batches, s.grad_accum) == (64, 8, 4)
    with pytest.raises(SystemExit, match="whole groups"):
        pg.Settings(64, group=4, chunk=6).check()
    with pytest.raises(SystemExit, match="must split"):
        pg.Settings(64, prompts=3, group=4, chunk=4, updates=2).check()


def test_both_sides_describe_the_same_run(tmp_path):
    """The official config's fields and diffalign's parsed config agree on every shared setting."""
    from diffalign.config import load_config

    s = pg.Settings(64, prompts=4, group=4, chunk=4, updates=2, steps=10, epochs=5, beta=0.0)
    pipe, data, out = tmp_path / "pipe", tmp_path / "prompts", tmp_path / "out"
    peer = pg.peer_overrides(s, pipe, data, out)
    cmd = pg.diffalign_command(Path("configs/sd3_flow_grpo_lora.yaml"), pipe, data / "train.txt", out, s)
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "sd3_flow_grpo_lora.yaml", cmd[5:])
    o, t = cfg.objective.params, cfg.train
    chunk = t.batch_size * o["group_size"] // (o["updates_per_rollout"] * t.grad_accum)  # rollout.round_split
    assert chunk == peer["sample.train_batch_size"] == peer["train.batch_size"] == 4
    assert (
        t.batch_size * o["group_size"]
        == peer["sample.num_batches_per_epoch"] * peer["sample.train_batch_size"]
    )
    assert o["group_size"] == peer["sample.num_image_per_prompt"]
    assert t.grad_accum == peer["train.gradient_accumulation_steps"] and t.max_steps == 5 * 2
    assert o["sample_steps"] == peer["sample.num_steps"] == 10
    assert (
        o["guidance_scale"] == peer["sample.guidance_scale"] == 4.5 and o["train_cfg"] and peer["train.cfg"]
    )
    assert o["noise_level"] == peer["sample.noise_level"]
    assert o["timestep_fraction"] == peer["train.timestep_fraction"] == 0.99
    assert o["beta"] == peer["train.beta"] == 0.0 and o["clip_range"] == peer["train.clip_range"] == 1e-4
    assert o["adv_clip"] == peer["train.adv_clip_max"] and o["global_std"] and peer["sample.global_std"]
    assert o["rewards"] == "jpeg_compressibility" and dict(peer["reward_fn"]) == {"jpeg_compressibility": 1.0}
    assert t.lr == peer["train.learning_rate"] and t.weight_decay == peer["train.adam_weight_decay"] == 1e-4
    assert t.max_grad_norm == peer["train.max_grad_norm"] and t.mixed_precision == "no"
    assert peer["mixed_precision"] == "no" and not peer["train.ema"] and t.ema_decay == 0
    assert (
        t.lr_scheduler == "constant" and t.seed == peer["seed"] and cfg.data.resolution == peer["resolution"]
    )
    assert cfg.model.max_sequence_length == 128 and cfg.model.path == str(pipe) == peer["pretrained.model"]
    # the trainer's hard-coded LoRA (train_sd3.py:419-432), restated
    official = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out"]
    official += ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
    assert sorted(cfg.lora.target_modules) == sorted(official)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.init) == (32, 64, "gaussian")
    assert t.checkpoint_every > t.max_steps and t.report_to == "none"
    assert peer["eval_freq"] > 5 and peer["save_freq"] > 5 and peer["sample.eval_num_steps"] == 1


def test_peer_config_file_loads_the_official_one_and_overrides(tmp_path):
    """The written config imports PEER/config/grpo.py as it is, calls compressibility() and sets every
    override (a stand-in grpo.py here: the real one needs ml_collections)."""
    peer = tmp_path / "peer"
    (peer / "config").mkdir(parents=True)
    (peer / "config" / "grpo.py").write_text(
        "from types import SimpleNamespace as N\n\n"
        "def compressibility():\n"
        "    return N(pretrained=N(model='sd3.5'), sample=N(num_steps=40), train=N(), seed=42)\n"
    )
    s = pg.Settings(64, steps=7)
    f = pg.write_peer_config(
        tmp_path / "peer_config.py", peer, pg.peer_overrides(s, tmp_path, tmp_path, tmp_path)
    )
    spec = importlib.util.spec_from_file_location("peer_config_under_test", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    assert c.pretrained.model == str(tmp_path) and c.sample.num_steps == 7 and c.train.cfg is True
    assert c.reward_fn == {"jpeg_compressibility": 1.0} and c.train.lora_path is None
    assert pg.peer_command(peer, f)[-1] == f"--config={f}"


def test_wandb_stand_in_logs_scalars_only(tmp_path, monkeypatch):
    log = tmp_path / "w.jsonl"
    monkeypatch.setenv("PEER_GRPO_BENCH_WANDB_LOG", str(log))
    (tmp_path / "wandb_stub_under_test.py").write_text(pg.WANDB_STUB)
    monkeypatch.syspath_prepend(str(tmp_path))
    import wandb_stub_under_test as w

    assert w.init(project="flow_grpo") is None
    w.log({"reward_avg": 0.5, "images": [w.Image("x.jpg", caption="c")], "epoch": 3}, step=2)
    assert json.loads(log.read_text()) == {"step": 2, "reward_avg": 0.5, "epoch": 3.0}
    sys.modules.pop("wandb_stub_under_test", None)


def test_imp_shim_load_source(tmp_path, monkeypatch):
    (tmp_path / "imp_shim_under_test.py").write_text(pg.IMP_SHIM)
    (tmp_path / "base_cfg.py").write_text("X = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import imp_shim_under_test as imp

    assert imp.load_source("base_cfg_loaded", str(tmp_path / "base_cfg.py")).X == 42
    assert sys.modules.pop("base_cfg_loaded").X == 42
    sys.modules.pop("imp_shim_under_test", None)


def test_run_timed_stops_a_trainer_that_never_ends(tmp_path):
    """A stand-in peer printing closed epoch bars forever (with a child process of its own, like its
    loader worker) is killed with its process group after the wanted rounds; timed to that moment."""
    code = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "e = 0\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
        "    sys.stderr.write('Epoch %d.0: training: 100%%|##| 4/4 [00:00<00:00]\\n' % e); e += 1\n"
    )
    env = pg.bench_env(1)
    r = pg.run_timed(
        [sys.executable, "-c", code], env, tmp_path, "peer", tmp_path / "log", rounds=3, updates=2
    )
    assert r.returncode == 0 and [n for n, _, _ in r.stamps] == [0, 1, 2]
    assert r.wall_s == r.stamps[-1][1] and r.exit_s() == 0 and r.peak_rss_kib > 0
    assert "Epoch 2.0: training" in (tmp_path / "log").read_text()
