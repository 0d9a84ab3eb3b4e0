"""Images, video clips and audio clips in one storage format and one tensor convention.

Every dataset column that holds "an image" (``jpg_0``/``jpg_1``, Syn-Pic ``images``) may hold any
of the three, told apart by their bytes:

- image: PNG/JPEG/WebP bytes -> ``[3, H, W]``;
- video: a PNG film strip, the F frames side by side (``F*W`` wide), with a ``frames`` text chunk
  -> ``[F, 3, H, W]`` (lossless, and viewable in any image viewer);
- audio: a 16-bit PCM WAV -> ``[S]`` waveform in [-1, 1] (sample rate kept alongside).

Tensors handed to the training loop are in [-1, 1] like images; rewards get [0, 1] frames or
[-1, 1] waveforms.

Decoded images are always 8-bit RGB (:func:`to_rgb`), whatever their mode or bit depth: EXIF
orientation applied, 16-bit greyscale scaled by its high byte (never clipped at 255), transparency
(RGBA, LA, palette or colour-key) composited over white (a 16-bit RGB PNG's colour key is matched
where it can be: Pillow drops the low bytes, so an image with pixels of the key's high bytes is a
counted skip), CMYK/1-bit/greyscale/palette converted.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, PngImagePlugin

Modality = Literal["image", "video", "audio"]


@dataclass
class Clip:
    """Video frames uint8 ``[F, H, W, 3]``."""

    frames: np.ndarray


@dataclass
class Audio:
    """A mono waveform float32 ``[S]`` in [-1, 1] at ``sample_rate`` Hz."""

    wave: np.ndarray
    sample_rate: int


Media = Image.Image | Clip | Audio


def encode_video(frames: np.ndarray) -> bytes:
    """uint8 ``[F, H, W, 3]`` -> PNG film strip bytes."""
    F, H, W, _ = frames.shape
    strip = frames.transpose(1, 0, 2, 3).reshape(H, F * W, 3)  # frames side by side
    info = PngImagePlugin.PngInfo()
    info.add_text("frames", str(F))
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def encode_audio(wave_: np.ndarray, sample_rate: int) -> bytes:
    """float ``[S]`` in [-1, 1] -> 16-bit PCM mono WAV bytes."""
    pcm = (np.clip(wave_, -1, 1) * 32767).round().astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(int(sample_rate))
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def encode_media(
    x: np.ndarray, modality: Modality, image_format: str = "png", sample_rate: int | None = None
) -> bytes:
    if modality == "video":
        return encode_video(x)
    if modality == "audio":
        if sample_rate is None:
            raise ValueError("audio needs a sample rate")
        return encode_audio(x, sample_rate)
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
    return buf.getvalue()


DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # truncated or unidentified images (UnidentifiedImageError is an OSError), unreadable files
    ValueError,
    SyntaxError,  # some PIL plugins on malformed headers
    EOFError,
    wave.Error,
    Image.DecompressionBombError,  # a tiny file declaring a huge canvas (PIL refuses > 2x its pixel limit)
)
"""Everything a hostile or corrupt media file can raise while decoding: a counted skip, never an abort."""


_ORIENTATION = 0x0112  # the EXIF tag that says how the camera was held
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _exif_orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1) or 1)
    except Exception:  # a malformed EXIF block does not make the pixels unreadable: no rotation
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB with its full range: EXIF orientation applied; 16-bit (and
    32-bit integer) greyscale reduced by its high byte, as Pillow reduces 16-bit RGB (65535 -> 255,
    so a 16-bit PNG neither clips nor wraps); transparency (RGBA, LA, PA, a palette's or a colour
    key's: an L, RGB or 16-bit grey PNG's ``tRNS``, the 16-bit key matched at full depth) composited
    over white; every other mode (CMYK, YCbCr, LAB, 1, L, P) by Pillow's conversion. 32-bit float
    images raise ValueError (their range is not defined): a counted skip."""
    if _exif_orientation(img) != 1:
        from PIL import ImageOps

        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode == "F":
        raise ValueError("32-bit float image: its value range is not defined; save it as 8 or 16 bit")
    if img.mode in _WIDE_GREY:
        raw = np.asarray(img).astype(np.int64)
        grey = (np.clip(raw, 0, 65535) >> 8).astype(np.uint8)
        key = img.info.get("transparency")
        if isinstance(key, int):  # a colour key: binary alpha, so its pixels over white are white
            grey[raw == key] = 255
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _drop_wide_key(img: Image.Image) -> None:
    """A 16-bit RGB PNG's colour key, on the 8-bit image Pillow makes of it (the high byte of each
    sample): a keyed pixel has the key's high bytes, so where no pixel has them nothing is keyed and the
    key is dropped (an 8-bit match on it would be wrong); otherwise the key cannot be told from its
    neighbours: ValueError, a counted skip."""
    key = np.array(img.info.pop("transparency"), np.int64) >> 8
    if (np.asarray(img) == key).all(-1).any():
        raise ValueError(
            "16-bit RGB PNG whose colour key (tRNS) 8-bit decoding cannot match: save it with alpha"
        )


def decode_media(blob: bytes | bytearray | str) -> Media:
    """Bytes (or a file path) -> ``Image`` (8-bit RGB, see :func:`to_rgb`) / ``Clip`` / ``Audio``;
    corrupt data raises (one of :data:`DECODE_ERRORS`) here, not later in the loop."""
    if isinstance(blob, str):
        with open(blob, "rb") as f:
            blob = f.read()
    if bytes(blob[:4]) == b"RIFF":
        with wave.open(io.BytesIO(blob), "rb") as w:
            if w.getsampwidth() != 2:
                raise ValueError(f"WAV sample width {w.getsampwidth() * 8} bit; only 16-bit PCM is supported")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
            return Audio((pcm.mean(1) / 32767).astype(np.float32), w.getframerate())
    img = Image.open(io.BytesIO(blob))
    wide_key = "transparency" in img.info and any(tile[3] == "RGB;16B" for tile in img.tile)
    img.load()
    if wide_key:
        _drop_wide_key(img)
    n = int(img.info.get("frames", 0)) if isinstance(img.info.get("frames", 0), str | int) else 0
    if n > 1:
        arr = np.asarray(to_rgb(img))
        H, FW, _ = arr.shape
        if FW % n:
            raise ValueError(f"film strip {FW} px wide does not split into {n} frames")
        return Clip(arr.reshape(H, n, FW // n, 3).transpose(1, 0, 2, 3).copy())
    return to_rgb(img)


def modality_of(x: Media) -> Modality:
    return "video" if isinstance(x, Clip) else "audio" if isinstance(x, Audio) else "image"


def media_tensors(
    items: list[Media], resolution: int, center_crop: bool, flip: bool, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A group (winner first) -> training tensors in [-1, 1] and the SDXL micro row ``[6]``.

    Images: :func:`pairs.joint_transform` (shared resize, crop, flip). Video: every frame of every
    clip gets the same resize and crop; flips are refused (they would turn "moving left" into
    "moving right"). Audio: waveforms trimmed to the shortest of the group."""
    from .pairs import DataError, joint_transform

    kinds = {modality_of(x) for x in items}
    if len(kinds) > 1:
        raise DataError(f"one group mixes {sorted(kinds)}; a row must hold one modality")
    kind = kinds.pop()
    if kind == "image":  # images handed over already decoded (a datasets Image column) are normalised too
        return joint_transform([to_rgb(x) for x in items], resolution, center_crop, flip, gen)
    if kind == "audio":
        n = min(len(a.wave) for a in items)
        x = torch.from_numpy(np.stack([a.wave[:n] for a in items])).float()  # [k, S]
        return x, torch.tensor([0, n, 0, 0, 0, n], dtype=torch.float32)
    if flip:
        raise DataError(
            "data.random_flip would mirror motion directions in video clips; set data.random_flip=false"
        )
    F = items[0].frames.shape[0]
    if any(c.frames.shape[0] != F for c in items):
        raise DataError(
            f"clips of one group have different frame counts {[c.frames.shape[0] for c in items]}"
        )
    frames = [Image.fromarray(f) for c in items for f in c.frames]
    x, micro = joint_transform(frames, resolution, center_crop, False, gen)  # [k*F, 3, R, R]
    return x.unflatten(0, (len(items), F)), micro


def to_reward_input(batch: list[np.ndarray], modality: Modality) -> torch.Tensor:
    """Generated media -> what rewards take: images ``[B,3,H,W]`` / clips ``[B,F,3,H,W]`` in [0,1]
    from uint8, waveforms ``[B,S]`` in [-1,1]."""
    arr = np.stack(batch)
    if modality == "audio":
        return torch.from_numpy(arr).float()
    x = torch.from_numpy(arr).float() / 255
    return x.permute(0, 3, 1, 2) if modality == "image" else x.permute(0, 1, 4, 2, 3)
