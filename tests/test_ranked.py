"""Ranked (Syn-Pic schema) data and RankDPO through the training loop."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from diffalign.config import DataConfig, load_config
from diffalign.data.pairs import DataError
from diffalign.data.ranked import RankedDataset
from diffalign.train import train


def _png(seed: int, size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def make_ranked(path, n=6, k=3, bad_rank=False):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"prompt": [], "images": [], "phi": [], "rank": []}
    for i in range(n):
        phi = list(np.random.default_rng(i).permutation(k) / (k - 1))
        rank = [int(r) for r in (np.argsort(np.argsort(-np.array(phi))) + 1)]
        rows["prompt"].append(f"a photo of {i} circles")
        rows["images"].append([_png(100 * i + j) for j in range(k)])
        rows["phi"].append([float(p) for p in phi])
        rows["rank"].append([1, 1, 2] if bad_rank and i == 2 else rank)
    pq.write_table(pa.table(rows), path)
    return path


def test_ranked_items_are_best_first(tmp_path):
    p = make_ranked(tmp_path / "r.parquet")
    ds = RankedDataset(DataConfig(path=str(p), resolution=32, format="ranked"))
    assert ds.k == 3 and len(ds) == 6
    item = ds[(0, 1)]
    assert item["pixels"].shape == (3, 3, 32, 32)
    assert item["rank"].tolist() == [1, 2, 3] and item["phi"].tolist() == sorted(
        item["phi"].tolist(), reverse=True
    )


def test_bad_rank_names_row(tmp_path):
    p = make_ranked(tmp_path / "r.parquet", bad_rank=True)
    with pytest.raises(DataError, match=r"r.parquet row 2: rank \[1, 1, 2\] must be a permutation of 1..3"):
        RankedDataset(DataConfig(path=str(p), resolution=32, format="ranked"))


def test_rankdpo_trains_and_pair_objective_refuses_k3(tiny_models, tmp_path):
    p = make_ranked(tmp_path / "r.parquet")
    base = [
        f"model.path={tiny_models['sd']}",
        f"data.path={p}",
        "data.format=ranked",
        "data.resolution=32",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.lr=1e-2",
        "objective.beta=100",
    ]
    m = train(load_config(None, [*base, "objective.name=rankdpo", f"train.output_dir={tmp_path / 'a'}"]))
    assert np.isfinite(m["loss"]) and 0 <= m["implicit_acc"] <= 1
    from diffalign.config import ConfigError

    with pytest.raises(ConfigError, match="trains on pairs but the data has 3 images per prompt"):
        train(load_config(None, [*base, f"train.output_dir={tmp_path / 'b'}"]))
    assert torch.tensor(m["loss"]).isfinite()


def test_cached_ranked_latents_give_the_same_loss(tiny_models, tmp_path):
    """``diffalign cache`` on a Syn-Pic ranked set: k latents per row (best first), phi and rank kept."""
    from diffalign.config import ConfigError
    from diffalign.data.cache import CachedPairs, build_cache

    p = make_ranked(tmp_path / "r.parquet", n=5, k=3)
    cache = tmp_path / "cache"
    base = [
        f"model.path={tiny_models['sd']}",
        f"data.path={p}",
        "data.format=ranked",
        "data.resolution=32",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.lr=1e-2",
        "objective.beta=100",
        "objective.name=rankdpo",
        "data.caption_dropout=0.3",
    ]
    cfg = load_config(None, [*base, f"train.output_dir={tmp_path / 'x'}", f"data.cache_dir={cache}"])
    build_cache(cfg, shard_size=2)
    assert len(list(cache.glob("shard-*.safetensors"))) == 3
    ds, src = (
        CachedPairs(cfg.data, cfg.model),
        RankedDataset(DataConfig(path=str(p), resolution=32, format="ranked")),
    )
    assert ds.k == 3 and len(ds) == 5
    item, ref = ds[(4, 0)], src[(4, 0)]
    assert (
        item["latents"].shape[0] == 3
        and item["rank"].tolist() == [1, 2, 3]
        and torch.equal(item["phi"], ref["phi"])
    )
    cached = train(
        load_config(None, [*base, f"train.output_dir={tmp_path / 'c'}", f"data.cache_dir={cache}"])
    )
    plain = train(load_config(None, [*base, f"train.output_dir={tmp_path / 'p'}"]))
    # the reference errors see the same latents (fp32 rounding of the VAE at another batch size, ~1e-7);
    # after one lr-1e-2 step the policy carries that rounding times beta, so its numbers agree to ~1e-4
    assert cached["err/ref_w"] == pytest.approx(plain["err/ref_w"], rel=1e-6)
    for k in ("loss", "err/policy_w", "implicit_acc"):
        assert cached[k] == pytest.approx(plain[k], rel=5e-4), k
    # a cache of other rankings is refused with a one-line reason, not silently trained on
    make_ranked(p, n=4, k=3)
    with pytest.raises(ConfigError, match=r"data.cache_dir .* is stale: data_fingerprint is '\w+' there"):
        CachedPairs(cfg.data, cfg.model)
