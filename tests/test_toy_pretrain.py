"""`diffalign toy pretrain --quick`: every stage runs, checkpoints, resumes and exports loadable pipelines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch


def test_quick_pretrain_exports_loadable_pipelines(tmp_path):
    work, out = tmp_path / "work", tmp_path / "models"
    cmd = [
        sys.executable,
        "-m",
        "diffalign.cli",
        "toy",
        "pretrain",
        "--quick",
        "--work",
        str(work),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    first = json.loads((work / "sd3" / "meta.json").read_text())
    # rerunning continues from the checkpoint instead of starting over
    p = subprocess.run(cmd + ["--stages", "sd3"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((work / "sd3" / "meta.json").read_text())["steps"] > first["steps"]

    def adam_steps(stage):
        state = torch.load(work / stage / "optimizer.pt", weights_only=True)["state"]
        return int(next(iter(state.values()))["step"])

    # continuing keeps AdamW's state (its step count is the stage's); --restart-optimizer starts a fresh one
    # from the EMA weights, so its count covers only the new steps
    before = json.loads((work / "sd" / "meta.json").read_text())["steps"]
    assert adam_steps("sd") == before
    p = subprocess.run(
        cmd + ["--stages", "sd", "--restart-optimizer"], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    after = json.loads((work / "sd" / "meta.json").read_text())["steps"]
    assert after > before and adam_steps("sd") == after - before

    from diffalign.models import load_pipeline

    for name in ("toy-sd", "toy-sd3"):
        pipe, kw = load_pipeline(out / name)
        img = pipe(
            ["a photo of a red circle"],
            num_inference_steps=2,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
            **kw,
        ).images
        assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()
    assert json.loads((out / "toy-sd3" / "diffalign.json").read_text())["call_defaults"] == {
        "max_sequence_length": 0
    }


def test_quick_av_pretrain_exports_loadable_video_and_audio_pipelines(tmp_path):
    work, out = tmp_path / "work", tmp_path / "models"
    cmd = [
        sys.executable,
        "-m",
        "diffalign.cli",
        "toy",
        "pretrain",
        "--quick",
        "--work",
        str(work),
        "--out",
        str(out),
        "--stages",
        "avae",
        "vocoder",
        "audio",
        "video",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    from diffalign.benchmarks.toyworlds.tones import N_SAMPLES
    from diffalign.benchmarks.toyworlds.video import FRAMES
    from diffalign.models import load_pipeline

    pipe, kw = load_pipeline(out / "toy-audio")
    assert type(pipe).__name__ == "AudioLDMPipeline" and kw["audio_length_in_s"] == N_SAMPLES / 8000
    audio = pipe(
        ["a high beep"], num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw
    ).audios
    assert audio.shape == (1, N_SAMPLES)
    pipe, kw = load_pipeline(out / "toy-video")
    assert type(pipe).__name__ == "AnimateDiffPipeline" and kw["num_frames"] == FRAMES
    frames = pipe(
        ["a red circle moving left"],
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kw,
    ).frames
    assert frames.shape == (1, FRAMES, 32, 32, 3)


def test_token_audio_run_starts_from_a_pooled_one_and_stays_tokens(tmp_path):
    """--audio-init copies every tensor whose name and shape match (all of the text tower, most of
    the UNet); the export loads as the Tango-style pipeline; continuing with the other
    conditioning is refused in one line."""
    import re
    import shutil

    base = [sys.executable, "-m", "diffalign.cli", "toy", "pretrain", "--quick", "--device", "cpu"]
    pooled = tmp_path / "pooled"
    p = subprocess.run(
        base + ["--work", str(pooled), "--out", str(tmp_path / "m0"), "--stages", "avae", "vocoder", "audio"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    work, out = tmp_path / "tokens", tmp_path / "m1"
    for stage in ("avae", "vocoder"):
        shutil.copytree(pooled / stage, work / stage)
    cmd = base + [
        "--work",
        str(work),
        "--out",
        str(out),
        "--stages",
        "audio",
        "--audio-conditioning",
        "tokens",
    ]
    p = subprocess.run(
        cmd + ["--audio-init", str(pooled / "audio")], capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    counts = {m: (int(a), int(b)) for m, a, b in re.findall(r"(\w+): (\d+)/(\d+) tensors from", p.stdout)}
    assert counts["text_encoder"][0] == counts["text_encoder"][1]
    assert (
        0 < counts["denoiser"][0] < counts["denoiser"][1]
    )  # the class embedding and cross-attention k/v differ
    from diffalign.models import load_pipeline

    pipe, _ = load_pipeline(out / "toy-audio")
    assert type(pipe).__name__ == "TokenAudioLDMPipeline"
    p = subprocess.run(
        cmd[:-2] + ["--audio-conditioning", "pooled"], capture_output=True, text=True, timeout=600
    )
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "a 'tokens'-conditioned run; continue it with text_conditioning='tokens'" in p.stderr


def test_video_with_frozen_spatial_layers_trains_only_motion_and_text(tmp_path):
    """--video-freeze-spatial: toy-sd's spatial weights come out unchanged, the motion modules and
    the text encoder move; continuing with the other recipe is refused in one line."""
    from safetensors.torch import load_file

    from diffalign.demo import asset

    work = tmp_path / "w"
    cmd = [
        sys.executable,
        "-m",
        "diffalign.cli",
        "toy",
        "pretrain",
        "--quick",
        "--device",
        "cpu",
        "--work",
        str(work),
        "--out",
        str(tmp_path / "m"),
        "--stages",
        "video",
    ]
    p = subprocess.run(cmd + ["--video-freeze-spatial"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((work / "video" / "meta.json").read_text())["freeze_spatial"] is True
    unet = load_file(str(work / "video" / "denoiser.safetensors"))
    sd = load_file(str(Path(asset("toy-sd")) / "unet" / "diffusion_pytorch_model.safetensors"))
    spatial = [k for k in unet if "motion_modules" not in k]
    assert spatial and all(torch.equal(unet[k], sd[k].float()) for k in spatial)
    from diffalign.benchmarks.toyworlds.pretrain_video import build_modules

    torch.manual_seed(0)  # the run's seed before it builds the motion adapter: the same initial weights
    fresh = build_modules(asset("toy-sd"))[0]
    motion = [k for k in unet if "motion_modules" in k and k.endswith("weight")]
    assert any(not torch.equal(unet[k], fresh["denoiser"].state_dict()[k]) for k in motion)
    te = load_file(str(work / "video" / "text_encoder.safetensors"))
    assert any(not torch.equal(v, fresh["text_encoder"].state_dict()[k]) for k, v in te.items())
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "a run with freeze_spatial=True" in p.stderr


def test_unusable_device_is_one_line(tmp_path):
    for device in ["bogus", *([] if torch.cuda.is_available() else ["cuda"])]:
        cmd = [
            sys.executable,
            "-m",
            "diffalign.cli",
            "toy",
            "pretrain",
            "--quick",
            "--work",
            str(tmp_path / "w"),
            "--device",
            device,
        ]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode != 0
        assert f"--device {device!r} is not usable here" in p.stderr and "Traceback" not in p.stderr, (
            p.stderr[-1000:]
        )
        assert not (tmp_path / "w").exists()  # refused before any work


def test_clip_tokenizer_makes_every_word_one_token(tmp_path):
    """BPE applies the lowest-ranked merge first: "right" merges r+i early, and a builder that merged
    "triangle" from its letters left it at t / ri / an / g / l / e (6 tokens). Every listed word must
    be one token, survive save/load, and unknown words still fall back to bytes."""
    from transformers import CLIPTokenizer

    from diffalign.benchmarks.toyworlds.pretrain import WORDS
    from diffalign.benchmarks.toyworlds.pretrain_video import VIDEO_WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    words = [*WORDS, *VIDEO_WORDS]
    tok = build_clip_tokenizer(words, model_max_length=16)
    tok.save_pretrained(str(tmp_path))
    again = CLIPTokenizer.from_pretrained(str(tmp_path))
    for w in words:
        if len(w) > 1:
            assert again.tokenize(w) == [f"{w}</w>"], w
    caption = "a purple triangle moving up then a black triangle appearing"
    assert len(again(caption).input_ids) == 12  # sot + 10 words + eot: fits the toy models' 16 tokens
    assert again.tokenize("a zebra") == ["a</w>", "z", "e", "b", "r", "a</w>"]


def test_extend_text_encoder_starts_a_merged_word_at_its_pieces(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffalign.benchmarks.toyworlds.pretrain_video import extend_text_encoder
    from diffalign.models.tokenizer import build_clip_tokenizer

    old = build_clip_tokenizer(["right", "a"])  # "triangle" is bytes and the "ri" merge here
    new = build_clip_tokenizer(["right", "a", "triangle", "moving"])
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(old),
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
        )
    )
    ext = extend_text_encoder(te, old, new, known_words=["triangle"])
    E_old, E_new = te.get_input_embeddings().weight.detach(), ext.get_input_embeddings().weight.detach()
    nv = new.get_vocab()
    pieces = old("triangle", add_special_tokens=False).input_ids
    assert len(pieces) > 1 and old.convert_ids_to_tokens(pieces)[1] == "ri"
    assert torch.allclose(E_new[nv["triangle</w>"]], E_old[pieces].mean(0))
    assert torch.equal(E_new[nv["right</w>"]], E_old[old.get_vocab()["right</w>"]])  # copied by string
    assert torch.allclose(E_new[nv["moving</w>"]], E_old.mean(0))  # not a known word: the mean of all rows
    assert E_new.shape[0] == len(new)


def test_pretraining_run_keeps_its_own_tokenizer(tmp_path):
    """A run saves its tokenizer when it starts and resumes/exports with that one, whatever the builder
    does later; a run from before runs saved theirs (checkpoints, no tokenizer) gets the old
    "letters" vocabulary its checkpoints were made with, not a shape mismatch deep in loading."""
    from diffalign.benchmarks.toyworlds.pretrain import tokenizer, work_tokenizer
    from diffalign.benchmarks.toyworlds.pretrain_video import video_tokenizer
    from diffalign.models.tokenizer import build_clip_tokenizer

    saved = tmp_path / "video.tokenizer"
    tok = work_tokenizer(saved, video_tokenizer, started=False)
    assert saved.is_dir() and tok.get_vocab() == video_tokenizer().get_vocab()
    build_clip_tokenizer(["zzz"]).save_pretrained(str(saved))
    assert "zzz</w>" in work_tokenizer(saved, video_tokenizer, started=True).get_vocab()  # the saved one wins
    legacy = work_tokenizer(tmp_path / "tokenizer", tokenizer, started=True)
    assert legacy.get_vocab() == tokenizer("letters").get_vocab() != tokenizer().get_vocab()
    assert legacy.tokenize("a triangle") == [
        "a</w>",
        "t",
        "ri",
        "an",
        "g",
        "l",
        "e</w>",
    ]  # what the shipped toy-sd saved
    from transformers import CLIPTokenizer

    from diffalign.demo import asset

    assert CLIPTokenizer.from_pretrained(asset("toy-sd") + "/tokenizer").get_vocab() == legacy.get_vocab()


def test_pretraining_checkpoint_survives_a_crash_at_every_point_of_the_swap(tmp_path):
    """_save_state writes ckpt.tmp, moves ckpt to ckpt.old, renames ckpt.tmp and drops ckpt.old. Killed
    between any two of those steps, settle_checkpoint leaves exactly one complete checkpoint at ckpt
    (the new one once ckpt.tmp is complete), and a half-written ckpt.tmp is never taken for one."""
    import shutil

    from diffalign.benchmarks.toyworlds.pretrain import _save_state, load_state, settle_checkpoint

    m = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(m.parameters())

    def save(path, step):
        _save_state(path, {"m": m}, {"m": m.state_dict()}, opt, {"steps": step})

    def step_of(path):
        return load_state(path, {"m": m}, {}, opt)["steps"]

    ck = tmp_path / "ck"
    tmp, old = tmp_path / "ck.tmp", tmp_path / "ck.old"
    assert not settle_checkpoint(ck)
    save(ck, 1)
    assert settle_checkpoint(ck) and step_of(ck) == 1 and not tmp.exists() and not old.exists()
    save(ck, 2)
    assert step_of(ck) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    # killed after ck -> ck.old, before ck.tmp -> ck: the complete new checkpoint is taken
    save(tmp_path / "new", 3)
    ck.rename(old)
    (tmp_path / "new").rename(tmp)
    assert settle_checkpoint(ck) and step_of(ck) == 3 and not old.exists() and not tmp.exists()
    # killed while writing ck.tmp (no meta.json yet): the old checkpoint stays, the scrap is ignored
    tmp.mkdir()
    shutil.copy(ck / "m.safetensors", tmp / "m.safetensors")
    assert settle_checkpoint(ck) and step_of(ck) == 3
    save(ck, 4)  # the next save clears the scrap first
    assert step_of(ck) == 4 and not tmp.exists()
    # killed after ck.tmp -> ck, before ck.old was dropped
    shutil.copytree(ck, old)
    assert settle_checkpoint(ck) and step_of(ck) == 4 and not old.exists()
