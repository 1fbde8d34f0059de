"""Image preprocessing shared by labelling, training and the exported HF image processor.

One function chain, so the pixels SigLIP sees while labelling, while training and after export are
the same:

1. :func:`load_image` -- decode a file with PIL and convert to RGB. Transparency is composited onto
   white, as ``transformers``' ``convert_to_rgb`` does (a plain ``convert("RGB")`` would expose the
   undefined colour under transparent pixels). A file that cannot be decoded raises
   :class:`ImageLoadError` naming the path, so a labelling run can skip it and log which one.
2. :func:`expand_to_square` (optional) -- LLaVA-1.5's ``expand2square``: pad the short side
   symmetrically to a square filled with the processor's mean colour as 0-255 RGB
   (``int(0.5 * 255) = 127`` for SigLIP, exactly the tuple LLaVA passes), so the whole image survives
   the resize undistorted. Stage 2 of the recipe uses it.
3. :func:`preprocess_image` -- bicubic resize with PIL (what HF's ``SiglipImageProcessor`` does with
   its PIL backend, ``resample=BICUBIC``; HF's torchvision backend, when torchvision is installed,
   uses torch's antialiased bicubic, which differs from PIL by up to a few 1e-3), rescale by 1/255,
   normalise ``(x - mean) / std`` with SigLIP's mean = std = 0.5, i.e. to [-1, 1].

Everything is numpy / PIL on the host; the result is float32 ``[h, w, 3]`` (channels last, the
layout of the Flax towers).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class ImageLoadError(RuntimeError):
    """An image file could not be read or decoded; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        super().__init__(f"cannot load image {self.path!r}: {reason}")


def mean_fill_colour(mean: Sequence[float] = SIGLIP_MEAN) -> tuple[int, int, int]:
    """The 0-255 RGB fill colour for :func:`expand_to_square`, ``int(m * 255)`` per channel as LLaVA."""
    if len(mean) != 3:
        raise ValueError(f"mean must have 3 channels, got {tuple(mean)}")
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; any alpha (or palette transparency) is composited onto white."""
    if image.mode == "RGB":
        return image
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decodes ``path`` fully and returns an RGB PIL image.

    Raises:
      ImageLoadError: the file is missing, unreadable, truncated, not an image, or a decompression
        bomb. The message names ``path``.
    """
    try:
        with warnings.catch_warnings():
            # PIL *warns* for images above MAX_IMAGE_PIXELS and raises only above twice that; a
            # labelling run over web data should treat both the same way: skip, and say which file.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decode now, so truncated files fail here and not later in a resize
                return to_rgb(img).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        # OSError covers missing files, PIL.UnidentifiedImageError and "image file is truncated";
        # ValueError / SyntaxError are what some PIL plugins raise on malformed headers.
        raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e


def expand_to_square(image: Image.Image, fill: Sequence[int] = mean_fill_colour()) -> Image.Image:
    """Pads ``image`` to a square of side max(w, h), centred, with the RGB ``fill`` colour.

    The offset of the pasted image is ``(side - short) // 2``, as LLaVA's ``expand2square``.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), tuple(int(c) for c in fill))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    height, width = (int(s) for s in size)
    return height, width


def preprocess_image(
    image: Image.Image | np.ndarray,
    size: int | Sequence[int],
    *,
    pad_to_square: bool = False,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    resample: int = Image.Resampling.BICUBIC,
) -> np.ndarray:
    """Resizes and normalises one image for SigLIP.

    Args:
      image: a PIL image (any mode) or a uint8 array ``[h, w, 3]``.
      size: output side, or (height, width).
      pad_to_square: first pad to a square with the mean colour (:func:`expand_to_square`).
      mean, std: per-channel normalisation on the [0, 1] scale.
      resample: PIL filter; bicubic as HF's SigLIP processor.

    Returns:
      float32 ``[height, width, 3]``; with SigLIP's mean/std, values in [-1, 1].
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"array images must be uint8 [h, w, 3], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    image = to_rgb(image)
    if pad_to_square:
        image = expand_to_square(image, mean_fill_colour(mean))
    height, width = _as_size(size)
    if image.size != (width, height):
        image = image.resize((width, height), resample=resample)
    pixels = np.asarray(image, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean_a = np.asarray(mean, np.float32)
    std_a = np.asarray(std, np.float32)
    return ((pixels - mean_a) / std_a).astype(np.float32)


def load_and_preprocess(
    path: str | os.PathLike,
    size: int | Sequence[int],
    *,
    pad_to_square: bool = False,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
) -> np.ndarray:
    """:func:`load_image` then :func:`preprocess_image`: float32 ``[h, w, 3]``.

    Raises:
      ImageLoadError: naming ``path`` when it cannot be decoded.
    """
    return preprocess_image(load_image(path), size, pad_to_square=pad_to_square, mean=mean, std=std)
