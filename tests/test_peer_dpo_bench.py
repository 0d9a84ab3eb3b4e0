"""benchmarks/perf/peer_dpo_bench.py: the parts that need no peer script (inputs, bar timing, peak RSS,
matching command lines); a short side-by-side run only when DIFFALIGN_PEER_DPO_SCRIPT names the script."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from diffalign.benchmarks.perf import peer_dpo_bench as pb


def _bar(desc: str, n: int, total: int, post: str = "") -> str:
    return f"\r{desc}: {100 * n // total:3d}%|##        | {n}/{total} [00:01<00:02,  1.00it/s{post}]"


def test_parse_bar_stamps_each_step_once_across_chunks():
    d = pb.DIFFALIGN_BAR
    pre = _bar("reference pre-pass", 1, 2)  # another bar of the same process: ignored
    b1, b1p, b2, b3 = _bar(d, 1, 3), _bar(d, 1, 3, ", loss=0.69"), _bar(d, 2, 3), _bar(d, 3, 3)
    chunks = [
        (0.5, pre + _bar(d, 0, 3)),
        (1.0, b1),
        (1.2, b1p),  # set_postfix repeats step 1: keeps the first stamp
        (2.0, b2[:20]),  # step 2 straddles two chunks: stamped when "2/3 [" arrived
        (2.5, b2[20:]),
        (3.0, b3 + "\n"),
    ]
    assert [(n, t) for n, t, _ in pb.parse_bar(chunks, d)] == [(1, 1.0), (2, 2.5), (3, 3.0)]
    assert pb.steady_rate(pb.parse_bar(chunks, d), batch=8) == pytest.approx(2 * 8 / 2.0)
    assert pb.parse_bar(chunks, pb.PEER_BAR) == []


def test_rates_and_cpu_per_pair():
    stamps = [(1, 1.0, 10.0), (2, 2.0, 12.0), (3, 3.0, 14.0), (4, 9.0, 16.0)]  # one stalled step
    assert pb.steady_rate(stamps, 8) == pytest.approx(3 * 8 / 8.0)
    assert pb.median_step_rate(stamps, 8) == pytest.approx(8 / 1.0)  # the stall does not count
    assert pb.cpu_per_pair(stamps, 8) == pytest.approx(6.0 / 24)
    assert pb.steady_rate([(1, 1.0, 0.0)], 8) != pb.steady_rate([(1, 1.0, 0.0)], 8)  # nan: one step
    chunks = [(1.0, _bar(pb.PEER_BAR, 1, 2), 5.0), (2.0, _bar(pb.PEER_BAR, 2, 2), 6.5)]
    assert pb.parse_bar(chunks, pb.PEER_BAR) == [(1, 1.0, 5.0), (2, 2.0, 6.5)]


def test_run_timed_reads_bar_and_peak_rss(tmp_path):
    code = (
        "import sys, time\n"
        "from tqdm import tqdm\n"
        "x = bytearray(300 * 2**20)\n"  # ~300 MiB resident at the peak
        "for i in range(len(x) // 4096): x[i * 4096] = 1\n"
        "del x\n"
        "for _ in tqdm(range(3), desc='Steps'): time.sleep(0.2)\n"
    )
    env = pb.bench_env(1)
    r = pb.run_timed([sys.executable, "-c", code], env, tmp_path, "Steps", "peer", tmp_path / "log")
    assert r.returncode == 0
    assert [n for n, _, _ in r.stamps] == [1, 2, 3]
    assert 0 <= r.cpu_s_per_pair(1) < 1.0  # sleeping, not computing
    assert 0.15 < (r.stamps[-1][1] - r.stamps[0][1]) / 2 < 1.0
    assert r.peak_rss_kib > 300 * 2**10
    assert "Steps" in (tmp_path / "log").read_text()


def test_commands_describe_the_same_run():
    s = pb.Settings(resolution=64, batch=8, steps=40, rank=8)
    p, d, o = Path("/p"), Path("/d/pairs/train.parquet"), Path("/o")
    peer = pb.peer_command(Path("s.py"), p, d, o, s)
    da = pb.diffalign_command(Path("c.yaml"), p, d, o, s, "default")
    fast = pb.diffalign_command(Path("c.yaml"), p, d, o, s, "fast")
    uncached = pb.diffalign_command(Path("c.yaml"), p, d, o, s, "uncached")
    for flag in ["--train_batch_size=8", "--max_train_steps=40", "--rank=8", "--resolution=64", "--no_hflip"]:
        assert flag in peer
    assert "--dataset_name=/d/pairs" in peer and "--beta_dpo=2500" in peer
    for ov in ["train.batch_size=8", "train.max_steps=40", "lora.rank=8", "data.resolution=64"]:
        assert ov in da
    assert "objective.beta=5000" in da and "data.random_flip=false" in da  # diffusers' beta * 2
    # the default path is the config's own data.cache_dir (auto, the default); uncached turns it off
    assert not any(a.startswith("data.cache_dir") for a in da + fast)
    assert "train.precompute_reference=true" in fast and "data.cache_dir=null" in uncached
    assert pb.diffalign_command(Path("c.yaml"), p, d, o, s, "cold") == da  # cold: an empty cache home


def test_tiny_inputs_load_on_both_sides(tmp_path):
    """The pairs are one parquet that load_dataset(FOLDER) reads as split train (as the script calls it)
    and diffalign reads as data.path; the pipeline's tokenizer loads the slow way the script asks for."""
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    from diffalign.config import DataConfig
    from diffalign.data.pairs import PairDataset

    pipe, data = pb.build_inputs(tmp_path, "tiny", 8)
    assert (pipe / "model_index.json").exists() and pb.pair_count(data) == 8
    ds = datasets.load_dataset(str(data.parent), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == 8 and {"caption", "jpg_0", "jpg_1", "label_0"} <= set(ds.column_names)
    assert len(PairDataset(DataConfig(path=str(data), resolution=64), verbose=False)) == 8
    tok = AutoTokenizer.from_pretrained(str(pipe), subfolder="tokenizer", use_fast=False)
    assert tok(["a red circle"], padding="max_length", max_length=tok.model_max_length).input_ids


def test_peer_env_stubs_only_what_is_missing(tmp_path):
    env = pb.peer_env(tmp_path, {"PYTHONPATH": "/x"}) if pb.importable("torchvision.transforms") else None
    if env is None:
        pytest.skip("torchvision missing: peer_env would install it (covered by the peer run below)")
    assert env["PYTHONPATH"].endswith("/x")
    if not pb.importable("wandb"):
        assert (tmp_path / "stub" / "wandb" / "__init__.py").exists()


@pytest.mark.skipif(
    not os.environ.get("DIFFALIGN_PEER_DPO_SCRIPT"),
    reason="set DIFFALIGN_PEER_DPO_SCRIPT to diffusers' train_diffusion_dpo.py (never committed)",
)
def test_side_by_side_smoke(tmp_path):
    res = pb.main(
        ["--peer-script", os.environ["DIFFALIGN_PEER_DPO_SCRIPT"], "--rounds", "1", "--steps", "3"]
        + ["--root", str(tmp_path), "--batch", "2", "--threads", "1"]
    )
    summary = res[0]["summary"]
    assert set(summary) == set(pb.MODES)
    assert all(r["pairs_per_s"] > 0 and r["peak_rss_gib"] > 0 for r in summary.values())
