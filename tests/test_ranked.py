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


def ranked_rows(start: int, n: int, k: int = 3, broken: tuple[int, ...] = ()) -> dict[str, list]:
    """Rows ``start..start+n`` of a ranked set; the images of the rows in ``broken`` are not images."""
    rows: dict[str, list] = {"prompt": [], "images": [], "phi": [], "rank": []}
    for i in range(start, start + n):
        phi = [float(p) for p in np.random.default_rng(i).permutation(k) / (k - 1)]
        rows["prompt"].append(f"a photo of {i} circles")
        rows["images"].append([b"not an image" if i in broken else _png(100 * i + j) for j in range(k)])
        rows["phi"].append(phi)
        rows["rank"].append([int(r) for r in (np.argsort(np.argsort(-np.array(phi))) + 1)])
    return rows


def test_incomplete_synpic_set_is_refused_unless_allowed(tmp_path, capsys):
    """A Syn-Pic folder is trained on only when index.json is valid and every shard matches it;
    data.allow_incomplete=true trains on the verified shards and says how many were left out."""
    from diffalign.synpic import write_ranked_set

    out = write_ranked_set(tmp_path / "set", [ranked_rows(0, 2), ranked_rows(2, 2), ranked_rows(4, 2)])
    assert len(RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked"), verbose=False)) == 6
    data = bytearray((out / "shard-00001.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / "shard-00001.parquet").write_bytes(bytes(data))
    with pytest.raises(DataError) as e:
        RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked"))
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and "1 of 3 shards do not match index.json" in msg
    assert "rerun `diffalign synpic`" in msg and "data.allow_incomplete=true" in msg
    ds = RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked", allow_incomplete=True))
    assert [r[2] for r in ds.rows] == [f"a photo of {i} circles" for i in (0, 1, 4, 5)]
    assert "left out 1 of 3" in ds.summary and "left out 1 of 3" in capsys.readouterr().out
    # an unfinished run (no index.json): refused too, and allowed on what verifies
    (out / "index.json").unlink()
    with pytest.raises(DataError, match=r"no index.json: synpic has not finished"):
        RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked"))
    assert (
        len(RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked", allow_incomplete=True)))
        == 4
    )


def test_training_refuses_or_allows_incomplete_ranked_set(tiny_models, tmp_path):
    from diffalign.synpic import write_ranked_set

    out = write_ranked_set(tmp_path / "set", [ranked_rows(0, 3), ranked_rows(3, 3)])
    (out / "shard-00001.parquet").unlink()
    base = [
        f"model.path={tiny_models['sd']}",
        f"data.path={out}",
        "data.format=ranked",
        "data.resolution=32",
        "train.max_steps=1",
        "train.batch_size=2",
        "objective.name=rankdpo",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    with pytest.raises(DataError, match=r"1 of 2 shards .*shard-00001.parquet: missing"):
        train(load_config(None, base))
    m = train(load_config(None, [*base, "data.allow_incomplete=true", f"train.output_dir={tmp_path / 'ok'}"]))
    assert np.isfinite(m["loss"])


def test_broken_image_in_ranked_group_is_a_counted_skip(tmp_path, capsys):
    """Like pairs: the group is replaced by the next readable one (same k, so the batch keeps its size)
    and counted in ``skipped``; only a set with no readable group at all is an error."""
    from diffalign.data.pairs import collate
    from diffalign.synpic import write_ranked_set

    out = write_ranked_set(tmp_path / "set", [ranked_rows(0, 4, broken=(1, 2))])
    ds = RankedDataset(DataConfig(path=str(out), resolution=32, format="ranked"), verbose=False)
    items = [ds[(i, 7)] for i in range(4)]
    assert [it["skipped"] for it in items] == [0, 2, 1, 0]
    assert [it["caption"] for it in items] == [f"a photo of {i} circles" for i in (0, 3, 3, 3)]
    batch = collate(items)
    assert batch["pixels"].shape == (4, 3, 3, 32, 32) and sum(batch["skipped"]) == 3
    assert batch["rank"].tolist() == [[1, 2, 3]] * 4
    assert "warning: skipping ranked group" in capsys.readouterr().out
    bad = write_ranked_set(tmp_path / "bad", [ranked_rows(0, 2, broken=(0, 1))])
    with pytest.raises(DataError, match="no ranked group with every image readable"):
        RankedDataset(DataConfig(path=str(bad), resolution=32, format="ranked"), verbose=False)[(0, 0)]
