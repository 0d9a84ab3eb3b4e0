"""rewards/compressibility.py against flow_grpo's ``flow_grpo/rewards.py:7-29`` (@ac4c86e), restated here
with PIL directly, and against hand-derived numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.errors import ConfigError
from diffalign.rewards import REWARDS, load_rewards

PROMPTS = ["a red circle", "a blue square", "a cat", "a dog"]


def official_kb(images: torch.Tensor) -> np.ndarray:
    """``jpeg_incompressibility()._fn`` of flow_grpo, restated line by line (``rewards.py:9-17``)."""
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    images = [Image.fromarray(image) for image in images]
    buffers = [io.BytesIO() for _ in images]
    for image, buffer in zip(images, buffers):
        image.save(buffer, format="JPEG", quality=95)
    sizes = [buffer.tell() / 1000 for buffer in buffers]
    return np.array(sizes)


def fixed_images() -> torch.Tensor:
    """Four 8-bit images as floats k/255: flat grey, a horizontal ramp, a checkerboard, uniform noise."""
    h = w = 48
    flat = np.full((h, w, 3), 128, np.uint8)
    ramp = np.broadcast_to(
        np.linspace(0, 255, w, dtype=np.float64).round().astype(np.uint8)[None, :, None], (h, w, 3)
    )
    checker = ((np.add.outer(np.arange(h) // 4, np.arange(w) // 4) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[:, :, None], 3, axis=2)
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr = np.stack([flat, ramp, checker, noise])  # [4,H,W,3]
    return torch.from_numpy(arr.copy()).permute(0, 3, 1, 2).float() / 255


def test_registered_and_loadable_from_a_spec():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(REWARDS.names())
    r = load_rewards(["jpeg_compressibility"])["jpeg_compressibility"]
    out = r(fixed_images(), PROMPTS)
    assert out.scores.shape == (4,) and out.scores.dtype == torch.float32 and out.scores.device.type == "cpu"


def test_matches_the_restated_official_computation():
    imgs = fixed_images()
    kb = official_kb(imgs)
    inc = REWARDS.get("jpeg_incompressibility")()(imgs, PROMPTS).scores
    comp = REWARDS.get("jpeg_compressibility")()(imgs, PROMPTS).scores
    np.testing.assert_array_equal(inc.numpy(), kb.astype(np.float32))
    np.testing.assert_array_equal(comp.numpy(), (-kb / 500).astype(np.float32))  # rewards.py:27


def test_hand_derived_units_and_scale():
    """The size is bytes / 1000 (not KiB) and compressibility is -kB / 500: read the byte count off a
    JPEG PIL writes for the noise image, derive both scores by hand."""
    imgs = fixed_images()[3:]
    buf = io.BytesIO()
    arr = (imgs[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    n_bytes = len(buf.getvalue())
    assert n_bytes > 1000  # 48x48 noise does not compress
    inc = float(REWARDS.get("jpeg_incompressibility")()(imgs, PROMPTS[:1]).scores[0])
    comp = float(REWARDS.get("jpeg_compressibility")()(imgs, PROMPTS[:1]).scores[0])
    assert inc == pytest.approx(n_bytes / 1000, rel=1e-7)
    assert comp == pytest.approx(-n_bytes / 1000 / 500, rel=1e-7)
    assert comp == pytest.approx(-inc / 500, rel=1e-7)


def test_quantisation_is_rounding_as_the_official():
    """Values a little off the 8-bit grid round to it (``(x * 255).round()``), so they score as the
    grid image; values past [0,1] by float error are clamped."""
    imgs = fixed_images()
    nudged = imgs + 0.3 / 255 * torch.sign(
        torch.randn(imgs.shape, generator=torch.Generator().manual_seed(1))
    )
    nudged = nudged.clamp(0, 1)
    r = REWARDS.get("jpeg_compressibility")()
    torch.testing.assert_close(r(nudged, PROMPTS).scores, r(imgs, PROMPTS).scores, atol=0, rtol=0)
    np.testing.assert_array_equal(
        r(nudged, PROMPTS).scores.numpy(), (-official_kb(nudged) / 500).astype(np.float32)
    )


def test_flat_image_is_more_compressible_than_noise():
    imgs = fixed_images()
    comp = REWARDS.get("jpeg_compressibility")()(imgs, PROMPTS).scores
    inc = REWARDS.get("jpeg_incompressibility")()(imgs, PROMPTS).scores
    flat, noise = 0, 3
    assert comp[flat] > comp[noise] and inc[flat] < inc[noise]
    assert (comp < 0).all() and (inc > 0).all()
    assert comp.argmax() == flat and comp.argmin() == noise


def test_batch_invariant_and_deterministic():
    imgs = fixed_images()
    r = REWARDS.get("jpeg_compressibility")()
    whole = r(imgs, PROMPTS).scores
    one = torch.cat([r(imgs[i : i + 1], PROMPTS[i : i + 1]).scores for i in range(4)])
    torch.testing.assert_close(one, whole, atol=0, rtol=0)


def test_bad_inputs_and_a_path_are_one_line_errors():
    r = REWARDS.get("jpeg_compressibility")()
    with pytest.raises(ConfigError, match=r"must be in \[0,1\]"):
        r(fixed_images() * 2 - 1, PROMPTS)
    with pytest.raises(ConfigError, match="must be float"):
        r((fixed_images() * 255).to(torch.uint8), PROMPTS)
    with pytest.raises(ConfigError, match="4 images but 3 prompts"):
        r(fixed_images(), PROMPTS[:3])
    with pytest.raises(ConfigError, match="loads no model.*plain 'jpeg_compressibility'"):
        load_rewards(["jpeg_compressibility=/some/model"])
