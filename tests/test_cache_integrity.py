"""The latent cache is content-addressed (issue #24): a cache of other data bytes, other VAE weights or
an old, unchecked format is refused in one line naming what changed; the same data and model train as
the uncached path; a ``kill -9``'d ``diffalign cache`` resumes to a byte-identical cache."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffalign.cli import main
from diffalign.config import ConfigError, load_config
from diffalign.data.cache import CachedPairs, build_cache

from conftest import make_pairs_parquet

LIMIT_S = 300  # per test; the subprocesses of the kill test have their own limits


@pytest.fixture(autouse=True)
def _timeout():
    """Each case runs with a timeout (no pytest-timeout here): SIGALRM raises in the test."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"test ran past {LIMIT_S}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def ovs(model: Path, data: Path, cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"data.cache_dir={cache}",
        f"train.output_dir={out}",
        "data.resolution=32",
        "train.lr=1e-2",
        "objective.beta=100",
        "train.checkpoint_every=100",
        *extra,
    ]


def cfg(*args: Path, extra: tuple[str, ...] = ()) -> object:
    return load_config(None, ovs(*args, *extra))


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in-process; it must fail with exit code 2 and one ``error:`` line: return it."""
    capsys.readouterr()
    assert main(list(args)) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


def test_other_parquet_with_the_same_captions_is_refused(tiny_models, tmp_path, capsys):
    model = tiny_models["sd"]
    data = make_pairs_parquet(tmp_path / "a" / "pairs.parquet", n=6, seed=0)
    cache = tmp_path / "cache"
    build_cache(cfg(model, data, cache, tmp_path / "x"), shard_size=4)
    # same captions and labels (so the row fingerprint agrees), other image bytes
    other = make_pairs_parquet(tmp_path / "b" / "other.parquet", n=6, seed=1)
    c = cfg(model, other, cache, tmp_path / "o")
    with pytest.raises(ConfigError) as e:
        CachedPairs(c.data, c.model)
    msg = str(e.value)
    assert "\n" not in msg and "`diffalign cache`" in msg
    assert f"was built from data file {data.resolve()} of {data.stat().st_size} bytes (sha256 " in msg
    assert f"data.path now gives {other} there, with other content" in msg
    # training stops at the same check, as one CLI error line (exit 2), before any model is loaded
    (tmp_path / "e.yaml").write_text("")
    line = cli_error(capsys, "train", str(tmp_path / "e.yaml"), *ovs(model, other, cache, tmp_path / "o"))
    assert f"data file {data.resolve()}" in line and "other content" in line
    # the same path rewritten with other images: named as the file that now has other content
    make_pairs_parquet(data, n=6, seed=2)
    c = cfg(model, data, cache, tmp_path / "o")
    with pytest.raises(
        ConfigError, match=rf"data file {data.resolve()} of \d+ bytes .*, which now has other"
    ):
        CachedPairs(c.data, c.model)


def _png(path: Path, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rgb = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_changed_image_named_by_a_jsonl_is_refused(tiny_models, tmp_path):
    """JSONL data: the JSONL file and every image it names are part of the cache's identity."""
    root = tmp_path / "data"
    root.mkdir()
    lines = []
    for i in range(4):
        _png(root / f"w{i}.png", 2 * i)
        _png(root / f"l{i}.png", 2 * i + 1)
        lines.append(json.dumps({"caption": "a red circle", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    c = cfg(tiny_models["sd"], root / "pairs.jsonl", tmp_path / "cache", tmp_path / "x")
    build_cache(c, shard_size=2)
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert [Path(r[0]).name for r in index["data_files"]][:3] == ["pairs.jsonl", "w0.png", "l0.png"]
    CachedPairs(c.data, c.model)
    _png(root / "l2.png", 99)  # one loser image redrawn
    with pytest.raises(
        ConfigError, match=rf"data file {root.resolve() / 'l2.png'} of \d+ bytes .*other content"
    ):
        CachedPairs(c.data, c.model)


def test_changed_vae_weights_are_refused(tiny_models, pairs_parquet, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_models["sd"], model)
    cache = tmp_path / "cache"
    c = cfg(model, pairs_parquet, cache, tmp_path / "x")
    build_cache(c, shard_size=4)
    CachedPairs(c.data, c.model)  # accepted before the change
    vae = model / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(vae)
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # one tensor nudged: same size file, other bytes
    save_file(weights, vae, metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        CachedPairs(c.data, c.model)
    msg = str(e.value)
    assert "\n" not in msg
    assert "was built with vae weights " in msg
    assert f"model.path {str(model)!r} now has " in msg
    assert "(vae/diffusion_pytorch_model.safetensors changed)" in msg and "`diffalign cache`" in msg
    # a `diffalign cache` rerun into that folder refuses too (it would mix old and new latents)
    (tmp_path / "e.yaml").write_text("")
    line = cli_error(
        capsys, "cache", str(tmp_path / "e.yaml"), *ovs(model, pairs_parquet, cache, tmp_path / "x")
    )
    assert "was built with vae weights" in line
    # a config-only change (the latent scale) is named as the vae's files
    shutil.copy(tiny_models["sd"] / "vae" / "diffusion_pytorch_model.safetensors", vae)
    vcfg = json.loads((model / "vae" / "config.json").read_text())
    (model / "vae" / "config.json").write_text(json.dumps({**vcfg, "scaling_factor": 0.25}))
    with pytest.raises(ConfigError, match=r"built with vae files \w+, .*\(vae/config.json changed\)"):
        CachedPairs(c.data, c.model)


def test_same_data_and_model_is_accepted_and_trains_as_uncached(tiny_models, pairs_parquet, tmp_path):
    from diffalign.train import train

    model, cache = tiny_models["sd"], tmp_path / "cache"
    build_cache(cfg(model, pairs_parquet, cache, tmp_path / "x"), shard_size=3)
    # a byte-identical copy elsewhere (new path, new mtime) is the same data: accepted, by content
    moved = tmp_path / "moved" / "pairs.parquet"
    moved.parent.mkdir()
    shutil.copy(pairs_parquet, moved)
    c = cfg(model, moved, cache, tmp_path / "x")
    assert len(CachedPairs(c.data, c.model)) == 8
    common = ("train.max_steps=2", "train.batch_size=2", "data.caption_dropout=0.3")
    cached = train(cfg(model, pairs_parquet, cache, tmp_path / "c", extra=common))
    plain = load_config(None, ovs(model, pairs_parquet, cache, tmp_path / "p", *common))
    plain.data.cache_dir = None
    uncached = train(plain)
    for k in ("loss", "err/policy_w", "err/ref_l"):
        assert cached[k] == pytest.approx(uncached[k], rel=1e-5, abs=1e-7), k


def test_old_format_index_is_refused(tiny_models, pairs_parquet, tmp_path, capsys):
    model, cache = tiny_models["sd"], tmp_path / "cache"
    c = cfg(model, pairs_parquet, cache, tmp_path / "x")
    build_cache(c, shard_size=4)
    index = json.loads((cache / "index.json").read_text())
    # exactly the keys the code before content addressing wrote
    old_keys = ("num_rows", "format", "k", "shard_size", "model_path", "family", "resolution")
    old = {k: index[k] for k in (*old_keys, "data_fingerprint")}
    (cache / "index.json").write_text(json.dumps(old, indent=2))
    with pytest.raises(ConfigError) as e:
        CachedPairs(c.data, c.model)
    msg = str(e.value)
    assert "\n" not in msg and "written by an older diffalign" in msg and "`diffalign cache`" in msg
    (tmp_path / "e.yaml").write_text("")
    line = cli_error(
        capsys, "cache", str(tmp_path / "e.yaml"), *ovs(model, pairs_parquet, cache, tmp_path / "x")
    )
    assert "written by an older diffalign" in line
    # and an index cut short (the old code wrote it in place) is refused as such, not a traceback
    (cache / "index.json").write_text(json.dumps(index)[:40])
    with pytest.raises(ConfigError, match="index.json is not valid JSON"):
        CachedPairs(c.data, c.model)


def test_rebuild_without_an_index_refuses_the_old_shards(tiny_models, tmp_path, capsys):
    """Deleting only index.json (after a "stale" error) must not let a rebuild of other data skip the
    old shards and file their latents under a new index: the build refuses, in one line."""
    model, cache = tiny_models["sd"], tmp_path / "cache"
    old = make_pairs_parquet(tmp_path / "a" / "pairs.parquet", n=6, seed=0)
    build_cache(cfg(model, old, cache, tmp_path / "x"), shard_size=4)
    (cache / "index.json").unlink()
    new = make_pairs_parquet(tmp_path / "b" / "pairs.parquet", n=6, seed=1)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    with pytest.raises(ConfigError) as e:
        build_cache(cfg(model, new, cache, tmp_path / "x"), shard_size=4)
    msg = str(e.value)
    assert "\n" not in msg and "holds shards without an index (shard-00000.safetensors and 2 more)" in msg
    assert "empty the folder or choose another data.cache_dir" in msg
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before  # nothing written, no new index
    (tmp_path / "e.yaml").write_text("")
    line = cli_error(capsys, "cache", str(tmp_path / "e.yaml"), *ovs(model, new, cache, tmp_path / "x"))
    assert "holds shards without an index" in line and not (cache / "index.json").exists()
    # emptied, the folder builds the new data: no shard of the old build survives
    shutil.rmtree(cache)
    c = cfg(model, new, cache, tmp_path / "x")
    build_cache(c, shard_size=4)
    assert (cache / "shard-00000.safetensors").read_bytes() != before["shard-00000.safetensors"]
    assert len(CachedPairs(c.data, c.model)) == 6


# `diffalign cache` with a small shard size (the CLI's is 256; same function, same writes)
BUILD = (
    "import sys; from diffalign.config import load_config; from diffalign.data.cache import build_cache; "
    "build_cache(load_config(None, sys.argv[2:]), shard_size=int(sys.argv[1]))"
)


def _shards(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("shard-*.safetensors")) if cache.exists() else []


def _build(args: list[str], kill_at: int | None = None) -> int:
    """Run the build in a subprocess; with ``kill_at``, SIGKILL it as soon as that many shards exist."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cache = Path(next(a for a in args if a.startswith("data.cache_dir=")).split("=", 1)[1])
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILD, "1", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    try:
        while kill_at is not None and proc.poll() is None and time.monotonic() < deadline:
            if len(_shards(cache)) >= kill_at:
                proc.send_signal(signal.SIGKILL)  # no cleanup handlers run, as for kill -9
                break
            time.sleep(0.002)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc in (0, -signal.SIGKILL), proc.stderr.read().decode()[-2000:] if proc.stderr else rc
    return rc


def test_kill_9_then_rerun_gives_a_byte_identical_cache(tiny_models, tmp_path):
    n = 16  # pairs; one per shard, so the kills land between shards and inside a shard's write
    data = make_pairs_parquet(tmp_path / "pairs.parquet", n=n)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    args = [f"model.path={tiny_models['sd']}", f"data.path={data}", "data.resolution=32"]
    assert _build([*args, f"data.cache_dir={whole}"]) == 0
    assert len(_shards(whole)) == n
    kills = 0
    for target in (1, 2, 3):
        # each run must make progress before it dies: at least one shard more than it found
        rc = _build([*args, f"data.cache_dir={resumed}"], kill_at=max(target, len(_shards(resumed)) + 1))
        kills += rc == -signal.SIGKILL
    assert kills == 3 and len(_shards(resumed)) < n, "the builds finished before they could be killed"
    assert _build([*args, f"data.cache_dir={resumed}"]) == 0
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in resumed.iterdir()) == names  # no .tmp left behind
    assert {"index.json", "uncond.safetensors"} <= set(names) and len(_shards(resumed)) == n
    for name in names:
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    # and the resumed cache is accepted for training and reads back the same latents
    c = load_config(None, [*args, f"data.cache_dir={resumed}"])
    item = CachedPairs(c.data, c.model)[(n - 1, 0)]
    assert item["latents"].shape[0] == 2 and torch.isfinite(item["latents"]).all()
