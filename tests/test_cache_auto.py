"""``data.cache_dir: auto`` (issue #23): a run that reads every row builds the latent cache at
start-up and trains from it; a later run over the same data and model reuses it; a run that reads a
part of the data, random flips, or a cache that would not fit on disk train uncached and say why; a
cache gone stale (the data rewritten) is rebuilt, never read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffalign.config import load_config
from diffalign.data.cache import CacheTooLarge, auto_dir, build_cache

from conftest import make_pairs_parquet


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFALIGN_CACHE_HOME", str(tmp_path / "home"))


def _cfg(model: Path, data: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            f"model.path={model}",
            f"data.path={data}",
            f"train.output_dir={out}",
            "data.resolution=32",
            "train.lr=1e-2",
            "objective.beta=100",
            "train.batch_size=2",
            "train.max_steps=4",  # 4 x 2 = the 8 rows: the run reads every row
            "train.checkpoint_every=100",
            *extra,
        ],
    )


def _lora(run: Path) -> dict[str, torch.Tensor]:
    step = (run / "checkpoints" / "latest").read_text().strip()  # the final checkpoint
    files = sorted((run / "checkpoints" / step / "export").glob("*.safetensors"))
    assert files, f"no export in {run}"
    return load_file(files[0])


def _said(capsys: pytest.CaptureFixture) -> str:
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("latent cache (data.cache_dir=auto)")]
    assert len(lines) == 1, out
    return lines[0]


def test_auto_builds_then_reuses_and_trains_as_uncached(tiny_models, pairs_parquet, tmp_path, capsys):
    from diffalign.train import train

    model = tiny_models["sd"]
    plain = train(_cfg(model, pairs_parquet, tmp_path / "plain", "data.cache_dir=null"))
    capsys.readouterr()
    first = train(_cfg(model, pairs_parquet, tmp_path / "a", "data.cache_dir=auto"))
    said = _said(capsys)
    c = _cfg(model, pairs_parquet, tmp_path)
    root = auto_dir(c.data, c.model)
    assert "built in" in said and str(root) in said, said
    assert (root / "index.json").exists() and str(root).startswith(str(tmp_path / "home"))
    shard = root / "shard-00000.safetensors"
    mtime = shard.stat().st_mtime_ns
    second = train(_cfg(model, pairs_parquet, tmp_path / "b", "data.cache_dir=auto"))
    said = _said(capsys)
    assert "reused" in said, said
    assert shard.stat().st_mtime_ns == mtime  # read, not rewritten
    # fp32: cached latents are the posterior means the uncached path computes, so the runs agree
    for k in ("loss", "err/policy_w", "err/ref_l"):
        assert first[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), k
        assert second[k] == first[k], k
    a, p = _lora(tmp_path / "a"), _lora(tmp_path / "plain")
    assert a.keys() == p.keys()
    # the cache encodes 8 images per VAE call, the live path 2 x batch (4 here): float-level latent
    # differences, which Adam's normalised steps carry into single weights (up to ~5e-5 of ~3e-2 seen);
    # over all LoRA B matrices (zero at the start, so they are the update) the runs agree to 1e-3
    b = [n for n in a if "lora_B" in n or "lora.up" in n]
    assert b, list(a)[:4]
    diff = torch.cat([(a[n] - p[n]).flatten() for n in b]).norm()
    assert diff <= 1e-3 * torch.cat([p[n].flatten() for n in b]).norm(), diff


def test_auto_is_off_when_it_would_not_pay_or_cannot_hold_the_view(
    tiny_models, pairs_parquet, tmp_path, capsys
):
    from diffalign.train import train

    model = tiny_models["sd"]
    home = tmp_path / "home" / "latents"
    train(_cfg(model, pairs_parquet, tmp_path / "part", "data.cache_dir=auto", "train.max_steps=1"))
    said = _said(capsys)
    assert "off: this run reads 2 of the data's 8 rows" in said, said
    assert not home.exists() or not any(home.iterdir())  # nothing built
    # random flips: validation accepts auto (an explicit cache_dir with flips is refused), trains uncached
    train(_cfg(model, pairs_parquet, tmp_path / "flip", "data.cache_dir=auto", "data.random_flip=true"))
    assert "off: random crops or flips" in _said(capsys)
    assert not home.exists() or not any(home.iterdir())


def test_auto_cache_too_large_for_the_disk_is_dropped(
    tiny_models, pairs_parquet, tmp_path, capsys, monkeypatch
):
    from diffalign.train import train

    model = tiny_models["sd"]
    with pytest.raises(CacheTooLarge, match=r"8 rows would take ~.* GiB \(more than the 0.0 GiB allowed\)"):
        build_cache(_cfg(model, pairs_parquet, tmp_path, f"data.cache_dir={tmp_path / 'c'}"), 4, max_bytes=1)

    class Usage:
        free = 1000  # bytes: half of it is far less than one shard

    monkeypatch.setattr("diffalign.data.cache.shutil.disk_usage", lambda _: Usage)
    out = train(_cfg(model, pairs_parquet, tmp_path / "big", "data.cache_dir=auto"))
    said = _said(capsys)
    assert "off: building it failed" in said and "would take" in said, said
    assert not auto_dir(
        _cfg(model, pairs_parquet, tmp_path).data, _cfg(model, pairs_parquet, tmp_path).model
    ).exists()
    assert out["loss"] == out["loss"]  # trained (uncached): finite


def test_auto_cache_of_rewritten_data_is_rebuilt(tiny_models, tmp_path, capsys):
    from diffalign.train import train

    model = tiny_models["sd"]
    data = make_pairs_parquet(tmp_path / "d" / "pairs.parquet", n=8, seed=0)
    train(_cfg(model, data, tmp_path / "a", "data.cache_dir=auto"))
    assert "built in" in _said(capsys)
    c = _cfg(model, data, tmp_path)
    root = auto_dir(c.data, c.model)
    before = load_file(root / "shard-00000.safetensors")["latents"]
    make_pairs_parquet(data, n=8, seed=1)  # same path, same captions, other images
    shutil.rmtree(tmp_path / "a")
    rebuilt = train(_cfg(model, data, tmp_path / "b", "data.cache_dir=auto"))
    assert "built in" in _said(capsys)  # the stale cache was replaced, not read
    after = load_file(root / "shard-00000.safetensors")["latents"]
    assert not torch.equal(before, after)
    plain = train(_cfg(model, data, tmp_path / "plain", "data.cache_dir=null"))
    for k in ("loss", "err/policy_w"):
        assert rebuilt[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), k
