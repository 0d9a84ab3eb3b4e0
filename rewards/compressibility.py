"""JPEG (in)compressibility: the model-free rewards of DDPO and Flow-GRPO.

Reference implementation: ``yifan123/flow_grpo@ac4c86e`` -- ``flow_grpo/rewards.py:7-19``
(``jpeg_incompressibility``) and ``:22-29`` (``jpeg_compressibility``). The size measurement is
``kvablack/ddpo-pytorch@1958463`` ``ddpo_pytorch/rewards.py:7-19`` line for line; DDPO's compressibility
is ``-size`` without flow_grpo's ``/ 500`` (``:27``). Each image is quantised to 8 bits as
``(x * 255).round().clamp(0, 255)`` in the images' own dtype (``torch.round``: halves to even), saved
by PIL as ``JPEG`` at ``quality=95`` (PIL's other defaults: 4:2:0 chroma subsampling), and its size
read as ``buffer.tell() / 1000`` (kilobytes of 1000 bytes):

- ``jpeg_incompressibility``: the size in kB (larger files score higher);
- ``jpeg_compressibility``: ``-size_kB / 500`` (smaller files score higher; what ``config/grpo.py``'s
  ``compressibility`` config trains with).

The prompt is not used (it is still checked for count, so the reward keeps the common calling
convention). Scores are float32 (the official returns float64 NumPy arrays; the values agree to
float32 precision).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

from diffalign.errors import ConfigError

from .base import REWARDS, RewardOutput, check_inputs

JPEG_QUALITY = 95
"""``image.save(buffer, format="JPEG", quality=95)`` (``rewards.py:15``)."""
KB = 1000
"""``buffer.tell() / 1000`` (``rewards.py:16``): decimal kilobytes."""
COMPRESSIBILITY_SCALE = 500
"""``-rew / 500`` (``rewards.py:27``)."""


def jpeg_kilobytes(images: Tensor) -> Tensor:
    """JPEG sizes ``[B]`` (float64, kB) of images ``[B,3,H,W]`` float in [0,1], as flow_grpo measures them."""
    from PIL import Image

    arr = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sizes = []
    for img in arr.transpose(0, 2, 3, 1):  # NCHW -> NHWC
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buf.tell() / KB)
    return torch.tensor(sizes, dtype=torch.float64)


class _JpegReward:
    uses_text = False

    def __init__(
        self,
        path: str = "",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        if path:
            name = type(self).registered_name  # set by REWARDS.register on both subclasses
            raise ConfigError(
                f"{name} measures JPEG file sizes and loads no model, so the path {path!r} does not exist "
                f"for it: write the reward spec as plain {name!r}"
            )
        self.device, self.dtype, self.batch_size = torch.device(device), dtype, batch_size

    def score(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: Tensor, prompts: list[str]) -> RewardOutput:
        check_inputs(images, prompts)
        return RewardOutput(self.score(images).float())


@REWARDS.register("jpeg_incompressibility")
class JpegIncompressibility(_JpegReward):
    """JPEG size in kB at quality 95 (flow_grpo / DDPO ``jpeg_incompressibility``); no model."""

    def score(self, images: Tensor) -> Tensor:
        return jpeg_kilobytes(images)


@REWARDS.register("jpeg_compressibility")
class JpegCompressibility(_JpegReward):
    """Minus the JPEG size in kB / 500 at quality 95 (flow_grpo ``jpeg_compressibility``); no model."""

    def score(self, images: Tensor) -> Tensor:
        return -jpeg_kilobytes(images) / COMPRESSIBILITY_SCALE
