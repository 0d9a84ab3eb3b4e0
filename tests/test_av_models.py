"""Video (AnimateDiff, ModelScope text-to-video) and audio (AudioLDM) families: storage format,
adapters, training with DPO (LoRA and full), export/reload, and Syn-Pic on clips."""

from __future__ import annotations

import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from diffalign.config import ConfigError, ModelConfig, load_config
from diffalign.data.media import (
    Audio,
    Clip,
    decode_media,
    encode_audio,
    encode_media,
    encode_video,
    media_tensors,
)

AV_FAMILIES = {"animatediff": "video", "text2video": "video", "audioldm": "audio"}


@pytest.fixture(scope="module")
def av_models(tmp_path_factory) -> dict[str, Path]:
    from diffalign._quiet import quiet_libraries
    from diffalign.models.tiny import build_tiny_pipeline

    quiet_libraries()
    root = tmp_path_factory.mktemp("tiny-av")
    for fam in AV_FAMILIES:
        build_tiny_pipeline(fam, root / fam)
    build_tiny_pipeline("audioldm", root / "audioldm-tokens", text_conditioning="tokens")  # Tango-style UNet
    return {fam: root / fam for fam in [*AV_FAMILIES, "audioldm-tokens"]}


def make_av_parquet(path: Path, modality: str, n: int = 8, seed: int = 0) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        if modality == "video":
            a, b = ((rng.random((3, 32, 32, 3)) * 255).astype(np.uint8) for _ in range(2))
            enc = encode_video
        else:
            a, b = ((rng.random(2048) * 1.6 - 0.8).astype(np.float32) for _ in range(2))

            def enc(w):
                return encode_audio(w, 8000)

        rows["caption"].append(["a red circle", "a blue square"][i % 2])
        rows["jpg_0"].append(enc(a))
        rows["jpg_1"].append(enc(b))
        rows["label_0"].append(float(i % 2))
        rows["label_1"].append(1.0 - float(i % 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path, row_group_size=4)
    return path


# ----------------------------------------------------------------------------- storage


def test_video_and_audio_round_trip_exactly():
    rng = np.random.default_rng(0)
    clip = (rng.random((5, 12, 10, 3)) * 255).astype(np.uint8)
    got = decode_media(encode_video(clip))
    assert isinstance(got, Clip) and np.array_equal(got.frames, clip)
    w = (rng.random(1000) * 2 - 1).astype(np.float32)
    a = decode_media(encode_audio(w, 8000))
    assert isinstance(a, Audio) and a.sample_rate == 8000 and np.abs(a.wave - w).max() <= 1 / 32767 + 1e-6
    img = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    from PIL import Image

    assert isinstance(decode_media(encode_media(img, "image")), Image.Image)  # a plain PNG stays an image


def test_bad_media_fail_clearly():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 100)
    with pytest.raises(ValueError, match="16-bit"):
        decode_media(buf.getvalue())
    clips = [Clip(np.zeros((3, 8, 8, 3), np.uint8)), Clip(np.zeros((3, 8, 8, 3), np.uint8))]
    with pytest.raises(ConfigError, match="random_flip"):
        media_tensors(clips, 8, True, True, torch.Generator())
    with pytest.raises(ConfigError, match="mixes"):
        media_tensors([clips[0], Audio(np.zeros(10, np.float32), 8000)], 8, True, False, torch.Generator())


def test_media_tensors_shapes():
    gen = torch.Generator().manual_seed(0)
    clips = [Clip(np.full((3, 16, 16, 3), v, np.uint8)) for v in (0, 255)]
    x, _ = media_tensors(clips, 8, True, False, gen)
    assert x.shape == (2, 3, 3, 8, 8) and x[0].max() == -1 and x[1].min() == 1
    a, _ = media_tensors(
        [Audio(np.ones(100, np.float32), 8000), Audio(-np.ones(90, np.float32), 8000)], 8, True, False, gen
    )
    assert a.shape == (2, 90)  # trimmed to the shortest of the group


# ----------------------------------------------------------------------------- adapters


def _x0(modality: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (
        torch.rand(2, 3, 3, 32, 32, generator=g) * 2 - 1
        if modality == "video"
        else torch.rand(2, 2048, generator=g) * 1.6 - 0.8
    )


@pytest.mark.parametrize("fam", [*AV_FAMILIES, "audioldm-tokens"])
def test_adapter_loads_and_matches_the_pipeline_denoising_step(av_models, fam):
    """The training-time conditioning is the sampling-time one: one DDIM step of the pipeline from
    given latents equals scheduler.step on the adapter's prediction."""
    from diffalign.models import load_adapter
    from diffalign.models.loading import load_pipeline

    a = load_adapter(ModelConfig(path=str(av_models[fam])))
    family = fam.removesuffix("-tokens")
    assert a.family == family and a.modality == AV_FAMILIES[family]
    z = a.encode_images(_x0(a.modality))
    assert z.ndim == (5 if a.modality == "video" else 4) and z.shape[0] == 2
    back = a.decode_latents(z)
    assert back.shape[0] == 2 and torch.isfinite(back).all()

    pipe, _ = load_pipeline(av_models[fam])
    latents = torch.randn(1, *z.shape[1:], generator=torch.Generator().manual_seed(1))
    seen: list[torch.Tensor] = []
    if a.modality == "video":
        out = pipe(
            ["a red circle"],
            num_inference_steps=1,
            guidance_scale=1.0,
            latents=latents.clone(),
            output_type="latent",
            num_frames=z.shape[2],
        )
        got = out.frames
    else:  # AudioLDM always decodes; its step callback sees the latents
        pipe(
            ["a red circle"],
            num_inference_steps=1,
            guidance_scale=1.0,
            latents=latents.clone(),
            audio_length_in_s=0.256,
            callback=lambda i, t, lat: seen.append(lat.clone()),
        )
        got = seen[-1]
    pipe.scheduler.set_timesteps(1)
    t = pipe.scheduler.timesteps[0]
    with torch.no_grad():
        eps = a.predict(latents, t.expand(1), a.encode_prompts(["a red circle"]))
    want = pipe.scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-5)


def test_audio_adapter_uses_the_folders_mel_front_end(av_models):
    from diffalign.models import load_adapter
    from diffalign.models.audio import MelConfig, log_mel

    a = load_adapter(ModelConfig(path=str(av_models["audioldm"])))
    assert a.mel.n_mels == 8 and a.mel.sample_rate == 8000  # from diffalign.json
    assert a.mel.n_mels == a.pipe.vocoder.config.model_in_dim
    f = log_mel(torch.zeros(1, 640), MelConfig(sample_rate=8000, n_fft=256, hop=64, n_mels=8, fmax=4000))
    assert f.shape == (1, 10, 8) and torch.allclose(
        f, torch.full_like(f, float(np.log(1e-5)))
    )  # silence at the floor


@pytest.mark.parametrize(
    "fam,mode",
    [
        ("animatediff", "lora"),
        ("text2video", "lora"),
        ("audioldm", "lora"),
        ("audioldm", "full"),
        ("text2video", "full"),
        ("audioldm-tokens", "lora"),
    ],
)
def test_dpo_trains_exports_and_reloads(av_models, tmp_path, fam, mode):
    from diffalign.models import load_adapter, load_trained_pipeline
    from diffalign.train import train

    data = make_av_parquet(tmp_path / "pairs.parquet", AV_FAMILIES[fam.removesuffix("-tokens")])
    extra = ["lora.rank=0", "train.lr=1e-3"] if mode == "full" else []
    out = tmp_path / "run"
    metrics = train(
        load_config(
            None,
            [
                f"model.path={av_models[fam]}",
                f"data.path={data}",
                f"train.output_dir={out}",
                "data.resolution=32",
                "data.random_flip=false",
                "train.lr=1e-2",
                "objective.beta=100",
                "train.max_steps=2",
                "train.batch_size=2",
                "train.checkpoint_every=100",
                *extra,
            ],
        )
    )
    assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    pipe = load_trained_pipeline(out)
    base = load_adapter(ModelConfig(path=str(av_models[fam])))
    z = base.encode_images(_x0(base.modality))[:1]
    t, cond = torch.tensor([500]), base.encode_prompts(["a dog"])
    with torch.no_grad():
        trained, orig = base.predict(z, t, cond, model=pipe.unet), base.predict(z, t, cond)
    assert not torch.allclose(trained, orig), "the exported weights must change the denoiser"
    if mode == "lora":  # adapters off = the base network (training never touched it; float noise from
        # a different attention processor after diffusers' LoRA load is allowed)
        from diffalign.train.reference import adapters_disabled

        with torch.no_grad(), adapters_disabled(pipe.unet):
            off = base.predict(z, t, cond, model=pipe.unet)
            assert torch.allclose(off, orig, atol=1e-5), float((off - orig).abs().max())


def test_token_audio_pipeline_conditions_on_word_order(av_models, tmp_path):
    """A Tango-style folder loads as TokenAudioLDMPipeline; its conditioning is the token states
    [B, L, D] (so two orders of the same words differ, where a bag of words would not), guidance
    and several clips per prompt work, and a bad diffalign.json value fails in one line."""
    import shutil

    from diffalign.models import load_adapter
    from diffalign.models.audio import TokenAudioLDMPipeline
    from diffalign.models.loading import ModelLoadError, load_pipeline

    pipe, kw = load_pipeline(av_models["audioldm-tokens"])
    assert type(pipe) is TokenAudioLDMPipeline
    a = load_adapter(ModelConfig(path=str(av_models["audioldm-tokens"])))
    cond = a.encode_prompts(["a red circle left of a blue square", "a blue square left of a red circle"])
    h = cond["encoder_hidden_states"]
    assert h.shape == (2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    assert not torch.allclose(h[0], h[1])
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    audio = pipe(
        ["a red circle", "a dog"],
        num_inference_steps=2,
        guidance_scale=3.0,
        num_waveforms_per_prompt=2,
        generator=gens,
        **kw,
    ).audios
    assert audio.shape == (4, 2048) and np.isfinite(audio).all()
    assert not pipe.unet._forward_pre_hooks, "the conditioning hook must not outlive the call"

    bad = tmp_path / "bad"
    shutil.copytree(av_models["audioldm-tokens"], bad)
    (bad / "diffalign.json").write_text(json.dumps({"text_conditioning": "pooling"}))
    with pytest.raises(ModelLoadError, match="text_conditioning 'pooling'; valid choices: pooled, tokens"):
        load_pipeline(bad)


def test_video_data_refuses_random_flip(av_models, tmp_path):
    from diffalign.train import train

    data = make_av_parquet(tmp_path / "pairs.parquet", "video", n=4)
    with pytest.raises(ConfigError, match="random_flip"):
        train(
            load_config(
                None,
                [
                    f"model.path={av_models['animatediff']}",
                    f"data.path={data}",
                    f"train.output_dir={tmp_path / 'r'}",
                    "data.resolution=32",
                    "data.random_flip=true",
                    "train.max_steps=1",
                    "train.batch_size=2",
                ],
            )
        )


# ----------------------------------------------------------------------------- Syn-Pic on clips


def test_synpic_on_audio_writes_wavs_and_checks_reward_modality(av_models, tmp_path):
    import pyarrow.parquet as pq

    from diffalign.rewards.clap import build_tiny_clap
    from diffalign.synpic import SynPicConfig, export_pairs, run_synpic

    clap = build_tiny_clap(tmp_path / "clap", sampling_rate=8000)
    (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
    cfg = dict(
        prompts=str(tmp_path / "p.txt"),
        generators=[str(av_models["audioldm"])],
        images_per_generator=2,
        steps=2,
        seed=0,
        shard_size=8,
        batch_prompts=2,
    )
    out = run_synpic(SynPicConfig(**cfg, rewards=[f"clap={clap}"], out=str(tmp_path / "syn")))
    tbl = pq.read_table(out / "shard-00000.parquet").to_pylist()
    assert len(tbl) == 2 and all(len(r["images"]) == 2 for r in tbl)
    a = decode_media(tbl[0]["images"][0])
    assert isinstance(a, Audio) and a.sample_rate == 8000 and len(a.wave) == 2048
    assert sorted(tbl[0]["rank"]) == [1, 2] and len(tbl[0]["scores.clap"]) == 2
    pairs = export_pairs(out, tmp_path / "pairs.parquet")
    assert isinstance(decode_media(pq.read_table(pairs).column("jpg_0")[0].as_py()), Audio)
    with pytest.raises(ConfigError, match="scores image"):
        run_synpic(SynPicConfig(**cfg, rewards=["pickscore=/nonexistent"], out=str(tmp_path / "syn2")))


@pytest.mark.parametrize("fam,flag", [("animatediff", "--toy-video"), ("audioldm", "--toy-audio")])
def test_eval_cli_judges_clips_and_writes_a_report(av_models, tmp_path, fam, flag, capsys):
    from diffalign.cli import main

    out = tmp_path / "ev"
    rc = main(
        [
            "eval",
            "--model",
            str(av_models[fam]),
            "--compare",
            str(av_models[fam]),
            flag,
            "heldout",
            "--n-prompts",
            "2",
            "--per-prompt",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc in (0, None)
    text = capsys.readouterr().out
    assert "overall" in text and "+0.000" in text  # the same model against itself: no difference
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert (
        len(rows) == 8
        and {r["model"] for r in rows} == {"model", "compare"}
        and all("reason" in r for r in rows)
    )
    page = (out / "index.html").read_text()
    assert (
        ("image/gif" in page)
        if flag == "--toy-video"
        else ("<audio controls" in page and "audio/wav" in page)
    )


@pytest.mark.parametrize("fam", ["animatediff", "audioldm"])
def test_cached_clip_latents_give_the_same_loss(av_models, tmp_path, fam):
    """``diffalign cache`` on clips: frame-wise video latents and mel-VAE audio latents train to the
    same loss."""
    from diffalign.data.cache import build_cache
    from diffalign.train import train

    data = make_av_parquet(tmp_path / "pairs.parquet", AV_FAMILIES[fam], n=6)
    base = [
        f"model.path={av_models[fam]}",
        f"data.path={data}",
        "data.resolution=32",
        "data.random_flip=false",
        "objective.beta=100",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.checkpoint_every=100",
    ]
    cache = tmp_path / "cache"
    build_cache(
        load_config(None, [*base, f"train.output_dir={tmp_path / 'x'}", f"data.cache_dir={cache}"]),
        shard_size=4,
    )
    assert len(list(cache.glob("shard-*.safetensors"))) == 2
    cached = train(
        load_config(None, [*base, f"train.output_dir={tmp_path / 'c'}", f"data.cache_dir={cache}"])
    )
    plain = train(load_config(None, [*base, f"train.output_dir={tmp_path / 'p'}"]))
    for k in ("loss", "err/policy_w", "err/ref_l"):
        assert cached[k] == pytest.approx(plain[k], rel=1e-5, abs=1e-7), k


def test_av_bench_runs_end_to_end_with_all_pairs(av_models, tmp_path):
    """``av_bench audio`` on a tiny AudioLDM: Syn-Pic, DPO on every pair of the k ranked clips, judged
    held-out evaluation of base and aligned model, report with playable audio."""
    import pyarrow.parquet as pq

    from diffalign.benchmarks.toyworlds.av_bench import run_av_bench
    from diffalign.rewards.clap import build_tiny_clap

    clap = build_tiny_clap(tmp_path / "clap", sampling_rate=8000)
    m = run_av_bench(
        "audio",
        str(tmp_path / "b"),
        ["diffusion_dpo"],
        str(av_models["audioldm"]),
        f"clap={clap}",
        n_train=2,
        k=3,
        steps=2,
        batch_size=1,
        n_eval=3,
        per_prompt=1,
        sample_steps=2,
        pairs_mode="all",
    )
    ranked = [
        r
        for f in sorted((tmp_path / "b" / "synpic").glob("shard-*.parquet"))
        for r in pq.read_table(f).to_pylist()
    ]
    distinct = sum(
        len(set(r["phi"][i] for i in pair)) == 2 for r in ranked for pair in ((0, 1), (0, 2), (1, 2))
    )
    assert len(ranked) == 2 and pq.read_metadata(tmp_path / "b" / "pairs.parquet").num_rows == distinct > 2
    assert m["settings"]["pairs_mode"] == "all" and set(m["gains"]) == {"diffusion_dpo"}
    assert m["base"]["n_per_tag"] == {"order": 1, "counting": 1, "silence": 1}
    assert "<audio controls" in (tmp_path / "b" / "report" / "index.html").read_text()
    verdicts = [
        json.loads(line) for line in (tmp_path / "b" / "report" / "results.jsonl").read_text().splitlines()
    ]
    assert [v["model"] for v in verdicts] == ["base"] * 3 + ["diffusion_dpo"] * 3 and all(
        "correct" in v for v in verdicts
    )
    # a pairs setting that cannot work fails before any Syn-Pic work
    with pytest.raises(ConfigError, match="n=2: the n best vs the n worst needs n >= 1 and mode best_worst"):
        run_av_bench(
            "audio",
            str(tmp_path / "c"),
            ["diffusion_dpo"],
            str(av_models["audioldm"]),
            f"clap={clap}",
            pairs_mode="all",
            pairs_n=2,
        )
    assert not (tmp_path / "c").exists()


def test_summarize_seeds_table_and_counts():
    from diffalign.benchmarks.toyworlds.av_bench import summarize_seeds

    def run(base, gains):
        return {
            "base": {"overall": base},
            "gains": {o: dict(zip(("diff", "ci95_low", "ci95_high"), g)) for o, g in gains.items()},
        }

    table, s = summarize_seeds(
        {
            2: run(0.183, {"dpo": (-0.025, -0.044, -0.006), "rank": (0.0, -0.015, 0.015)}),
            0: run(0.2, {"dpo": (0.094, 0.062, 0.127), "rank": (0.025, 0.006, 0.044)}),
            1: run(0.229, {"dpo": (-0.021, -0.05, 0.008), "rank": (0.006, -0.013, 0.025)}),
        }
    )
    assert s["dpo"] == {
        "mean": pytest.approx(0.016),
        "min": -0.025,
        "max": 0.094,
        "above_zero": 1,
        "below_zero": 1,
        "runs": 3,
    }
    assert (
        s["rank"]["above_zero"] == 1
        and s["rank"]["below_zero"] == 0
        and s["rank"]["mean"] == pytest.approx(0.031 / 3)
    )
    rows = table.splitlines()
    assert rows[0] == "| seed | base | dpo gain [95% CI] | rank gain [95% CI] |"
    assert [r.split(" | ")[0] for r in rows[2:5]] == ["| 0", "| 1", "| 2"]  # sorted by seed
    assert rows[2] == "| 0 | 0.200 | +0.094 [+0.062, +0.127] | +0.025 [+0.006, +0.044] |"
    assert rows[5] == "| **mean (range)** | – | +0.016 (-0.025 to +0.094) | +0.010 (+0.000 to +0.025) |"
    assert rows[6] == "| CI above / below zero | – | 1 / 1 of 3 | 1 / 0 of 3 |"


def test_av_bench_cli_several_seeds(av_models, tmp_path):
    from diffalign.benchmarks.toyworlds.av_bench import main
    from diffalign.rewards.clap import build_tiny_clap

    clap = build_tiny_clap(tmp_path / "clap", sampling_rate=8000)
    common = [
        "audio",
        "--base",
        str(av_models["audioldm"]),
        "--reward",
        f"clap={clap}",
        "--objectives",
        "diffusion_dpo",
        "--n-train",
        "2",
        "--k",
        "2",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--n-eval",
        "3",
        "--per-prompt",
        "1",
        "--sample-steps",
        "2",
    ]
    main([*common, "--out", str(tmp_path / "m"), "--seed", "3", "5"])
    for sd in (3, 5):
        r = json.loads((tmp_path / "m" / f"seed-{sd}" / "results.json").read_text())
        assert r["settings"]["seed"] == sd
    summary = json.loads((tmp_path / "m" / "seeds.json").read_text())
    assert summary["diffusion_dpo"]["runs"] == 2
    assert (
        "| 3 |" in (tmp_path / "m" / "seeds.md").read_text()
        and "| 5 |" in (tmp_path / "m" / "seeds.md").read_text()
    )
    with pytest.raises(SystemExit):
        main([*common, "--out", str(tmp_path / "d"), "--seed", "1", "1"])


def test_av_table_has_a_gain_row_only_when_there_is_a_comparison():
    from diffalign.benchmarks.toyworlds.av_bench import _table

    summ = {"per_tag": {"order": 0.25, "counting": 0.5}, "overall": 0.375, "overall_ci95": [0.25, 0.5]}
    res = {"base": {"summary": summ}, "dpo": {"summary": summ | {"overall": 0.5}}}
    one = _table(["base"], res, {})
    assert one.splitlines()[-1] == "| **overall** | 0.375 [0.250, 0.500] |"  # no dangling empty gain cell
    two = _table(["base", "dpo"], res, {"dpo": {"diff": 0.125, "ci95_low": 0.0625, "ci95_high": 0.1875}})
    assert two.splitlines()[-1] == "| gain vs base | – | +0.125 [+0.062, +0.188] |"
    assert two.splitlines()[2] == "| counting | 0.500 | 0.500 |"  # tags sorted
