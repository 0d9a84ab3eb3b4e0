"""Batched tensor preprocessing against the reference pipelines at real resize ratios (issue #25, item 4).

The references (restated here with PIL and transformers' own ``CLIPImageProcessor``): the image is
saved as uint8 (``round(255 x)``), resized by PIL's antialiased bicubic (``CLIPImageProcessor`` and
torchvision's ``Resize`` on a PIL image both call ``Image.resize``), centre cropped, rescaled and
normalised. Images: 512 px renders with hard edges (the bicubic overshoot matters there) and smooth
noise, down- and upscaled, non-square.

Stated tolerances (in [0,1] pixel units before normalisation): max |diff| <= 2/255 and at most 1% of
pixels differ at all (PyTorch's uint8 port of PIL's fixed-point filter); the float route used on
non-CPU devices: max |diff| <= 2/255. Scores on a tiny random CLIP: within 2e-3 (logit scale ~14).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_rewards import PROMPTS

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def sample_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Half hard-edged rectangles on flat backgrounds, half smooth noise; float in [0,1]."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, h, w)
    for i in range(n):
        if i % 2 == 0:
            img = torch.rand(3, 1, 1, generator=g).expand(3, h, w).clone()
            for _ in range(6):
                y0, x0 = (
                    int(torch.randint(0, h - 8, (1,), generator=g)),
                    int(torch.randint(0, w - 8, (1,), generator=g)),
                )
                dy, dx = (
                    int(torch.randint(4, h // 2, (1,), generator=g)),
                    int(torch.randint(4, w // 2, (1,), generator=g)),
                )
                img[:, y0 : y0 + dy, x0 : x0 + dx] = torch.rand(3, 1, 1, generator=g)
        else:
            img = F.interpolate(
                torch.rand(1, 3, h // 16, w // 16, generator=g), size=(h, w), mode="bilinear"
            )[0]
        out[i] = img.clamp(0, 1)
    return out


def pil_uint8(img: torch.Tensor) -> Image.Image:
    """What saving the float image gives (diffusers' numpy_to_pil: round half to even)."""
    return Image.fromarray(np.round(img.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def pil_resize_ref(imgs: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B,3,h,w]`` float: PIL ``Image.resize((w, h), BICUBIC)`` of each saved image, / 255."""
    out = [np.asarray(pil_uint8(im).resize((w, h), Image.BICUBIC)) for im in imgs]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


CASES = [(512, 512, 224), (512, 768, 224), (768, 512, 224), (512, 512, 32), (96, 160, 224)]


@pytest.mark.parametrize("h,w,size", CASES)
def test_pil_resize_matches_pil_within_the_stated_tolerance(h, w, size):
    from diffalign.rewards.clip_family import clip_resize_size
    from diffalign.rewards.preprocess import pil_resize

    imgs = sample_images(4, h, w, seed=h + w + size)
    oh, ow = clip_resize_size(h, w, size)
    ref = pil_resize_ref(imgs, oh, ow)
    got = pil_resize(imgs, (oh, ow))
    d = (got - ref).abs()
    assert got.shape == ref.shape == (4, 3, oh, ow)
    assert d.max() <= 2 / 255 + 1e-6 and (d > 1e-6).float().mean() <= 0.01, (
        d.max() * 255,
        (d > 0).float().mean(),
    )


def test_float_route_of_other_devices_within_tolerance():
    """The route off the CPU (PyTorch's uint8 antialiased bicubic is CPU-only), run on the CPU."""
    from diffalign.rewards.preprocess import pil_resize

    imgs = sample_images(4, 512, 768, seed=7)
    ref = pil_resize_ref(imgs, 224, 336)
    got = pil_resize(imgs, (224, 336), kernel="float")
    d = (got - ref).abs()
    assert d.max() <= 2 / 255 + 1e-6 and (d > 1e-6).float().mean() <= 0.01, (
        d.max() * 255,
        (d > 0).float().mean(),
    )


def processor_pixels(
    imgs: torch.Tensor, size: int, crop: int, mean=OPENAI_MEAN, std=OPENAI_STD
) -> torch.Tensor:
    """transformers' CLIPImageProcessor (PIL backend) on the saved images: PickScore's README path."""
    try:
        from transformers import CLIPImageProcessorPil as Proc  # transformers 5: the PIL backend by name
    except ImportError:
        from transformers import CLIPImageProcessor as Proc  # 4.x: PIL is the only backend
    proc = Proc(
        size={"shortest_edge": size},
        crop_size={"height": crop, "width": crop},
        resample=3,
        image_mean=mean,
        image_std=std,
    )
    return proc(images=[pil_uint8(im) for im in imgs], return_tensors="pt").pixel_values


@pytest.mark.parametrize("h,w", [(512, 512), (512, 768), (768, 512)])
def test_clip_preprocess_matches_clip_image_processor(h, w):
    from diffalign.rewards import clip_preprocess

    imgs = sample_images(4, h, w, seed=11)
    ref = processor_pixels(imgs, 224, 224)
    got = clip_preprocess(imgs, 224, 224, OPENAI_MEAN, OPENAI_STD)
    # normalised units: 2/255 divided by the smallest std
    assert got.shape == ref.shape and (got - ref).abs().max() <= 2 / 255 / min(OPENAI_STD) + 1e-5


def test_pickscore_score_matches_processor_path_on_512px(tiny_clip):
    """End to end at 512 px: the reward on float images vs the model on CLIPImageProcessor pixels."""
    import json

    from transformers import CLIPModel, CLIPTokenizerFast

    from diffalign.rewards import PickScore

    pre = json.loads((tiny_clip / "preprocessor_config.json").read_text())
    size, crop = pre["size"]["shortest_edge"], pre["crop_size"]["height"]
    imgs = sample_images(4, 512, 640, seed=5)
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    px = processor_pixels(imgs, size, crop, pre["image_mean"], pre["image_std"])
    t = CLIPTokenizerFast.from_pretrained(str(tiny_clip))(
        PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        ie = model.get_image_features(pixel_values=px)
        te = model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
    ie, te = getattr(ie, "pooler_output", ie), getattr(te, "pooler_output", te)
    want = model.logit_scale.exp().detach() * F.cosine_similarity(ie, te, dim=-1)
    with pytest.warns(UserWarning, match="1 of 4 prompts"):
        got = PickScore(str(tiny_clip))(imgs, PROMPTS).scores
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
