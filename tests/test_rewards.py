"""Rewards: parity of every reward with a direct restatement of its published formula on the same
tiny random weights (saved and reloaded through the real loader), contract tests over every
registered reward, and one-line errors for bad input."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import test_image_reward as _ir  # the tiny ImageReward checkpoint builder
import torch
import torch.nn.functional as F

from diffalign.errors import ConfigError
from diffalign.rewards import REWARDS

# several tests score long prompts on purpose; the truncation warning itself is tested in test_reward_text.py
pytestmark = pytest.mark.filterwarnings("ignore:.*prompts were longer than:UserWarning")

OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
LONG = "a photo of " + " and ".join(["a red circle", "a blue square"] * 20)  # > 77 tokens: truncation matters
PROMPTS = ["a photo of a red circle", "a blue square left of a green triangle", LONG, "two yellow circles"]


def images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


# ----------------------------------------------------------------------------- tiny checkpoints


def build_tiny_open_clip(out: Path, seed: int = 0) -> Path:
    """An OpenCLIP ViT state dict (open_clip key names and layouts, random weights), saved the way
    HPSv2 ships it (``{'state_dict': ...}`` in a .pt), with its config and a CLIP BPE tokenizer."""
    from diffalign.models.tiny import WORDS
    from diffalign.models.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(WORDS)
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": len(tok), "width": 32, "heads": 2, "layers": 2},
    }
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "visual.conv1.weight": r(32, 3, 14, 14, s=0.05),
        "visual.class_embedding": r(32),
        "visual.positional_embedding": r(5, 32),
        "visual.ln_pre.weight": 1 + r(32),
        "visual.ln_pre.bias": r(32),
        "visual.ln_post.weight": 1 + r(32),
        "visual.ln_post.bias": r(32),
        "visual.proj": r(32, 16),
        "token_embedding.weight": r(len(tok), 32),
        "positional_embedding": r(77, 32),
        "ln_final.weight": 1 + r(32),
        "ln_final.bias": r(32),
        "text_projection": r(32, 16),
        "logit_scale": torch.tensor(np.log(1 / 0.07), dtype=torch.float32),
        "attn_mask": torch.full((77, 77), float("-inf")).triu(1),
    }  # old open_clip saved this buffer
    for tower in ("visual.transformer", "transformer"):
        for i in range(2):
            p = f"{tower}.resblocks.{i}."
            sd |= {
                p + "ln_1.weight": 1 + r(32),
                p + "ln_1.bias": r(32),
                p + "ln_2.weight": 1 + r(32),
                p + "ln_2.bias": r(32),
                p + "attn.in_proj_weight": r(96, 32),
                p + "attn.in_proj_bias": r(96),
                p + "attn.out_proj.weight": r(32, 32),
                p + "attn.out_proj.bias": r(32),
                p + "mlp.c_fc.weight": r(128, 32),
                p + "mlp.c_fc.bias": r(128),
                p + "mlp.c_proj.weight": r(32, 128),
                p + "mlp.c_proj.bias": r(32),
            }
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": sd, "epoch": 1}, out / "HPS_v2.1_compressed.pt")
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    tok.save_pretrained(str(out))
    return out


def build_tiny_aesthetic_head(out: Path, dim: int, seed: int = 0) -> Path:
    from diffalign.rewards.aesthetic import aesthetic_mlp

    torch.manual_seed(seed)
    torch.save({f"layers.{k}": v for k, v in aesthetic_mlp(dim).state_dict().items()}, out)
    return out


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("hps") / "hps")


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory, tiny_clip) -> Path:
    dim = json.loads((tiny_clip / "config.json").read_text())["projection_dim"]
    return build_tiny_aesthetic_head(tmp_path_factory.mktemp("aes") / "head.pth", dim)


# ----------------------------------------------------------------------------- parity


def clip_processor_inputs(clip_dir: Path, imgs: torch.Tensor, prompts: list[str]):
    """The published path: transformers' CLIPProcessor on uint8 images (PickScore's README)."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPTokenizer

    proc = CLIPImageProcessor.from_pretrained(str(clip_dir))
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in imgs]
    px = proc(images=pil, return_tensors="pt").pixel_values
    t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    return px, t


def quantised(imgs: torch.Tensor) -> torch.Tensor:
    return (imgs * 255).round() / 255


def test_pickscore_and_clip_score_parity_with_processor_and_formula(tiny_clip):
    """Images 30x40 (shortest side = the processor's 30, so PIL does no resampling): the
    centre crop, mean/std and 77-token truncation must agree with CLIPProcessor exactly."""
    from transformers import CLIPModel

    from diffalign.rewards import CLIPScore, PickScore

    imgs = quantised(images(4, 30, 40))
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    px, t = clip_processor_inputs(tiny_clip, imgs, PROMPTS)
    assert t.input_ids.shape[1] == 77  # LONG was truncated
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=px)
        te = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
    ie, te = ie / ie.norm(dim=-1, keepdim=True), te / te.norm(dim=-1, keepdim=True)
    cos = (ie * te).sum(-1)
    torch.testing.assert_close(
        PickScore(str(tiny_clip))(imgs, PROMPTS).scores,
        model.logit_scale.exp().detach() * cos,
        atol=1e-5,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        CLIPScore(str(tiny_clip))(imgs, PROMPTS).scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5
    )


def open_clip_forward(
    sd: dict, cfg: dict, px: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCLIP's ViT and text transformer restated from the raw state dict (open_clip model.py)."""
    v, t = cfg["vision_cfg"], cfg["text_cfg"]

    def block(x, p, heads, mask):
        B, L, W = x.shape
        h = F.layer_norm(x, (W,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
        q, k, vv = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).split(W, dim=-1)
        q, k, vv = (z.view(B, L, heads, W // heads).transpose(1, 2) for z in (q, k, vv))
        a = q @ k.transpose(-1, -2) / (W // heads) ** 0.5
        if mask is not None:
            a = a + mask
        o = (a.softmax(-1) @ vv).transpose(1, 2).reshape(B, L, W)
        x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = F.layer_norm(x, (W,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.gelu(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]

    w = v["width"]
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = (
        torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, w), x], dim=1)
        + sd["visual.positional_embedding"]
    )
    x = F.layer_norm(x, (w,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"])
    for i in range(v["layers"]):
        x = block(x, f"visual.transformer.resblocks.{i}.", w // v["head_width"], None)
    img = (
        F.layer_norm(x[:, 0], (w,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
        @ sd["visual.proj"]
    )
    tw = t["width"]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(t["layers"]):
        x = block(x, f"transformer.resblocks.{i}.", t["heads"], causal)
    x = F.layer_norm(x, (tw,), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ sd["text_projection"]
    return img, txt


def open_clip_tokenize(tok, prompts: list[str], context: int = 77) -> torch.Tensor:
    """open_clip ``tokenize``: [sot] + bpe + [eot], cut to the context with eot last, zero padded."""
    out = torch.zeros(len(prompts), context, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids = [tok.bos_token_id] + tok.encode(p, add_special_tokens=False) + [tok.eos_token_id]
        if len(ids) > context:
            ids = ids[:context]
            ids[-1] = tok.eos_token_id
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def hps_resize_max_size(img: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2 ``ResizeMaxSize`` on one [3,H,W] tensor: longest side to size, pad [l, t, r, b]."""
    H, W = img.shape[1:]
    scale = size / float(max(H, W))
    nh, nw = (round(d * scale) for d in (H, W))
    img = F.interpolate(img[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - nh, size - nw
    left, top, right, bottom = pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2
    padded = torch.zeros(3, size, size)
    padded[:, top : size - bottom, left : size - right] = img
    assert (top, left) == ((size - nh) // 2, (size - nw) // 2) and right + left == pad_w
    return padded


@pytest.mark.parametrize("hw", [(40, 56), (56, 40), (20, 20)])
def test_hpsv2_parity_with_open_clip_formula(tiny_open_clip, hw):
    from transformers import CLIPTokenizer

    from diffalign.rewards import HPSv2

    sd = torch.load(tiny_open_clip / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    cfg = json.loads((tiny_open_clip / "open_clip_config.json").read_text())["model_cfg"]
    tok = CLIPTokenizer.from_pretrained(str(tiny_open_clip))
    imgs = quantised(images(4, *hw, seed=1))  # the PIL image the reference reads
    px = torch.stack([(hps_resize_max_size(im, 28)[None] - OPENAI_MEAN)[0] / OPENAI_STD[0] for im in imgs])
    ids = open_clip_tokenize(tok, PROMPTS)
    assert ids[2, -1] == tok.eos_token_id and (ids[2] != 0).all()  # LONG is cut, ends in eot
    img, txt = open_clip_forward(sd, cfg, px, ids)
    cos = (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(
        HPSv2(str(tiny_open_clip), scale="cosine")(imgs, PROMPTS).scores, cos, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        HPSv2(str(tiny_open_clip))(imgs, PROMPTS).scores, 100 * cos, atol=1e-3, rtol=1e-5
    )


def test_pad_preprocess_pads_black_symmetrically():
    from diffalign.rewards import pad_preprocess

    img = torch.ones(1, 3, 20, 40)  # white, wide: longest side 40 -> 28, short side 14 -> 7 + 7 rows of pad
    px = pad_preprocess(img, 28, [0.0] * 3, [1.0] * 3)
    assert px.shape == (1, 3, 28, 28)
    assert (px[..., :7, :] == 0).all() and (px[..., 21:, :] == 0).all()
    torch.testing.assert_close(px[..., 7:21, :], torch.ones(1, 3, 14, 28))


def test_open_clip_folder_serves_clip_score(tmp_path, tiny_open_clip):
    """An OpenCLIP checkpoint in the hub layout loads into CLIPScore through the converter."""
    import shutil

    from safetensors.torch import save_file

    from diffalign.rewards import CLIPScore, HPSv2

    d = tmp_path / "oc"
    shutil.copytree(tiny_open_clip, d)
    sd = torch.load(d / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "open_clip_model.safetensors"))
    (d / "HPS_v2.1_compressed.pt").unlink()
    imgs = quantised(images(2, 28, 28))
    cos = HPSv2(str(d), scale="cosine")(imgs, PROMPTS[:2]).scores  # 28x28 needs no resize: pad and crop agree
    torch.testing.assert_close(
        CLIPScore(str(d))(imgs, PROMPTS[:2]).scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-5
    )


def test_aesthetic_parity_with_formula(tiny_clip, tiny_head):
    from transformers import CLIPModel

    from diffalign.rewards import AestheticV2

    imgs = quantised(images(3, 40, 30, seed=2))
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    px, _ = clip_processor_inputs(tiny_clip, imgs, PROMPTS[:3])
    with torch.no_grad():
        e = model.get_image_features(pixel_values=px)
    e = getattr(e, "pooler_output", e)
    e = e / e.norm(dim=-1, keepdim=True)
    w = torch.load(tiny_head, weights_only=True)
    for i in (0, 2, 4, 6, 7):  # linear layers; dropouts are identity at inference
        e = e @ w[f"layers.{i}.weight"].T + w[f"layers.{i}.bias"]
    got = AestheticV2(str(tiny_clip), head=str(tiny_head))(imgs, PROMPTS[:3]).scores
    torch.testing.assert_close(got, e.squeeze(-1), atol=1e-5, rtol=1e-5)


def test_clip_bpe_file_gives_clip_vocabulary_layout(tmp_path):
    """A BPE file in CLIP's format -> vocabulary: 512 byte symbols, one token per merge, sot/eot."""
    import gzip

    from diffalign.rewards.open_clip import clip_tokenizer_from_bpe

    f = tmp_path / "bpe.txt.gz"
    with gzip.open(f, "wt", encoding="utf-8") as fh:
        fh.write("#version: 0.2\nr e\nre d</w>\nc i\nci r\ncir c\ncirc l\ncircl e</w>\n")
    tok = clip_tokenizer_from_bpe(f)
    assert len(tok) == 512 + 7 + 2 and tok.eos_token_id == len(tok) - 1 and tok.bos_token_id == len(tok) - 2
    ids = tok("red circle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "red</w>", "circle</w>", "<|endoftext|>"]
    assert tok.convert_ids_to_tokens([0, 93, 94]) == ["!", "~", "¡"]  # printable bytes first, by code point


# ----------------------------------------------------------------------------- contract


BUILDERS: dict[str, Callable] = {
    "jpeg_compressibility": lambda d, clip: REWARDS.get("jpeg_compressibility")(),
    "jpeg_incompressibility": lambda d, clip: REWARDS.get("jpeg_incompressibility")(),
    "pickscore": lambda d, clip: REWARDS.get("pickscore")(str(clip)),
    "clip_score": lambda d, clip: REWARDS.get("clip_score")(str(clip)),
    "hpsv2": lambda d, clip: REWARDS.get("hpsv2")(str(build_tiny_open_clip(d / "hps"))),
    "aesthetic": lambda d, clip: REWARDS.get("aesthetic")(
        str(clip),
        head=str(
            build_tiny_aesthetic_head(
                d / "h.pth", json.loads((clip / "config.json").read_text())["projection_dim"]
            )
        ),
    ),
    "step_aware": lambda d, clip: REWARDS.get("step_aware")(str(clip)),
    "image_reward": lambda d, clip: REWARDS.get("image_reward")(
        str(_ir.write_folder(d / "ir", _ir.official_state_dict()))
    ),
}


# image rewards only; audio rewards (modality "audio") have their contract in test_clap.py
IMAGE_REWARDS = sorted(n for n in REWARDS.names() if getattr(REWARDS.get(n), "modality", "image") == "image")


def test_every_registered_reward_has_a_tiny_builder():
    assert sorted(BUILDERS) == IMAGE_REWARDS


@pytest.fixture(scope="module", params=IMAGE_REWARDS)
def reward(request, tmp_path_factory, tiny_clip):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param), tiny_clip)


def test_contract(reward):
    name, r = reward
    imgs = images(8, 36, 44, seed=3)
    prompts = [PROMPTS[i % 4] for i in range(8)]
    out = r(imgs, prompts)
    assert out.scores.shape == (8,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"
    assert torch.isfinite(out.scores).all()
    torch.testing.assert_close(r(imgs, prompts).scores, out.scores, atol=0, rtol=0)  # deterministic
    r.batch_size = 1
    one = r(imgs, prompts).scores
    r.batch_size = 8
    torch.testing.assert_close(one, out.scores, atol=1e-5, rtol=1e-5)  # batch-size invariant
    params = list(r.model.parameters()) if hasattr(r, "model") else None  # None: model-free (JPEG size)
    assert params is None or (params and all(p.device == r.device for p in params))
    assert not out.scores.requires_grad
    # scores differ across images (the model looks at its input); the clamp of clip_score can zero
    # every score of a random tiny model, so look at its cosine there
    varied = r.cosine(imgs, prompts) if name == "clip_score" else out.scores
    assert varied.unique().numel() > 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x: x * 2 - 1, r"must be in \[0,1\]"),
        (lambda x: (x * 255).to(torch.uint8), "must be float"),
        (lambda x: x.permute(0, 2, 3, 1), r"\[B,3,H,W\]"),
    ],
)
def test_bad_images(reward, bad, match):
    _, r = reward
    with pytest.raises(ConfigError, match=match):
        r(bad(images(2, 32, 32)), PROMPTS[:2])


def test_bad_prompts(reward):
    _, r = reward
    with pytest.raises(ConfigError, match="prompt list is empty"):
        r(images(0, 32, 32), [])
    with pytest.raises(ConfigError, match="2 images but 3 prompts"):
        r(images(2, 32, 32), PROMPTS[:3])


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("name", sorted(REWARDS.names()))
def test_missing_weights_path(name, tmp_path, offline):
    with pytest.raises(ConfigError, match="does not exist|not found|holds none|has neither"):
        REWARDS.get(name)(str(tmp_path / "no" / "such" / "model"))


def test_offline_hub_id_is_one_clear_error(offline):
    from diffalign.rewards import HPSv2

    with pytest.raises(
        ConfigError, match="cannot get 'HPS_v2.1_compressed.pt' from hub repo 'no-such-user/no-such-hps'"
    ):
        HPSv2("no-such-user/no-such-hps")


def test_reward_bench_runs_and_scores_agree(tiny_clip):
    from diffalign.benchmarks.perf.reward_bench import main

    res = main(["--reward", f"pickscore={tiny_clip}", "--images", "8", "--batch-size", "4", "--repeats", "1"])
    assert res["images"] == 8 and res["batched_img_s"] > 0 and res["one_at_a_time_img_s"] > 0


def test_step_aware_pm_is_its_clip_at_init_and_learns_time(tiny_clip, tmp_path):
    from diffalign.rewards import PickScore, StepAwarePM

    imgs = images(4, 30, 30, seed=5)
    spm = StepAwarePM(str(tiny_clip))
    base = PickScore(str(tiny_clip))(imgs, PROMPTS).scores
    torch.testing.assert_close(spm(imgs, PROMPTS, t=700).scores, base, atol=1e-5, rtol=1e-5)  # identity init
    with torch.no_grad():
        for p in spm.time.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    s0, s9 = spm(imgs, PROMPTS, t=0).scores, spm(imgs, PROMPTS, t=900).scores
    assert not torch.allclose(s0, s9) and not torch.allclose(s0, base)
    per_image_t = spm(imgs, PROMPTS, t=torch.tensor([0, 900, 0, 900])).scores
    torch.testing.assert_close(per_image_t[[0, 2]], s0[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_image_t[[1, 3]], s9[[1, 3]], atol=1e-5, rtol=1e-5)
    again = StepAwarePM(str(spm.save(tmp_path / "spm")))
    torch.testing.assert_close(again(imgs, PROMPTS, t=900).scores, s9, atol=1e-6, rtol=1e-6)


def test_open_clip_converter_refuses_unmapped_tensors(tiny_open_clip, tmp_path):
    """Layer scale (ls_1) is not part of CLIPModel: loading must fail, not silently drop it."""
    import shutil

    from diffalign.rewards import HPSv2

    d = tmp_path / "ls"
    shutil.copytree(tiny_open_clip, d)
    ck = torch.load(d / "HPS_v2.1_compressed.pt", weights_only=True)
    ck["state_dict"]["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)
    torch.save(ck, d / "HPS_v2.1_compressed.pt")
    with pytest.raises(ConfigError, match="does not cover.*ls_1"):
        HPSv2(str(d))


def test_clip_preprocess_resize_geometry_truncates_like_the_processor():
    """Long side = int(size * long / short), as CLIPImageProcessor and torchvision compute it."""
    from diffalign.rewards import clip_preprocess

    seen = {}
    import torch.nn.functional as Fn

    real = Fn.interpolate

    def spy(x, size=None, **kw):
        seen["size"] = size
        return real(x, size=size, **kw)

    import diffalign.rewards.clip_family as cf

    cf.F.interpolate = spy
    try:
        clip_preprocess(torch.rand(1, 3, 45, 67), 30, 30, [0.0] * 3, [1.0] * 3)  # 67 * 30 / 45 = 44.67 -> 44
    finally:
        cf.F.interpolate = real
    assert seen["size"] == (30, 44)


def test_step_aware_pm_dtype_and_timestep_checks(tiny_clip):
    from diffalign.rewards import StepAwarePM

    imgs = images(3, 32, 32, seed=6)
    bf = StepAwarePM(str(tiny_clip), dtype=torch.bfloat16)(imgs, PROMPTS[:3], t=500).scores
    fp = StepAwarePM(str(tiny_clip))(imgs, PROMPTS[:3], t=500).scores
    assert bf.dtype == torch.float32 and torch.allclose(bf, fp, atol=0.5)
    with pytest.raises(ConfigError, match="2 timesteps for 3 images"):
        StepAwarePM(str(tiny_clip))(imgs, PROMPTS[:3], t=torch.tensor([1, 2]))
