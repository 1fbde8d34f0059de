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

Files under an image root. A record names its image relative to a root (a local folder or
``gs://bucket/prefix``); :func:`resolve_under_root` turns the pair into the one path that may be
read, or refuses it with :class:`ImagePathError` *before* anything is opened: an absolute path, a
URL, a NUL byte, or a path that resolves outside the root (``..`` segments, or locally a symlink
that leads out). On ``gs://`` the key is normalised (``a//b``, ``./a`` name the same object as
locally) and any ``..`` segment is refused (object names have no parent directories to resolve).
:func:`decode_image` decodes bytes (a ``gs://`` object, an image stored inside a record) with
the same checks as :func:`load_image`, so both give the pixels the file would.
"""
from __future__ import annotations

import dataclasses
import io
import os
import posixpath
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from sea_jax import storage

SIGLIP_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
SIGLIP_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)


class ImageLoadError(RuntimeError):
    """An image file could not be read or decoded; ``path`` names it."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        super().__init__(f"cannot load image {self.path!r}: {reason}")


class ImagePathError(ValueError):
    """An image path that is not a plain relative path inside its image root (never opened)."""


def check_relative(rel: object) -> str:
    """``rel`` if it is a plain relative path that stays below whatever root it is joined to, by
    its text alone (no file system): a non-empty string, no NUL byte, not a URL, not absolute, and
    no ``..`` that climbs above its start after normalisation.

    Raises:
      ImagePathError: saying which rule ``rel`` breaks.
    """
    if not isinstance(rel, str) or not rel:
        raise ImagePathError(f"image path {rel!r} is not a non-empty string")
    if "\x00" in rel:
        raise ImagePathError(f"image path {rel!r} contains a NUL byte")
    if "://" in rel:
        raise ImagePathError(f"image path {rel!r} is a URL, not a path relative to the image root")
    if rel.startswith("/") or os.path.isabs(rel):
        raise ImagePathError(f"image path {rel!r} is absolute, not relative to the image root")
    norm = posixpath.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise ImagePathError(f"image path {rel!r} climbs out of the image root")
    return rel


def resolve_under_root(root: str, rel: object) -> str:
    """The path of image ``rel`` (as a record names it) under ``root``, checked, not opened.

    ``root`` is a local folder (``""`` = the working directory) or ``gs://bucket/prefix``. Local:
    ``os.path.join(root, rel)``, refused when its real path (symlinks resolved) is not inside the
    root's real path. ``gs://``: ``root/normpath(rel)``, refused when ``rel`` has a ``..`` segment.
    Both first apply :func:`check_relative`.

    Raises:
      ImagePathError: ``rel`` is not a non-empty string, holds a NUL byte, is absolute or a URL, or
        resolves outside the root; the message says which.
    """
    rel = check_relative(rel)
    if root.startswith("gs://"):
        # An object name is not resolved by anyone: "a/../b" would be read as a literal key on
        # GCS while naming another file locally, so a ".." segment is refused outright.
        if ".." in rel.split("/"):
            raise ImagePathError(f"image path {rel!r} has a '..' segment (refused under a gs:// root)")
        key = posixpath.normpath(rel)
        if key == ".":
            raise ImagePathError(f"image path {rel!r} names the image root itself")
        return root.rstrip("/") + "/" + key
    path = os.path.join(root, rel)
    real_root = os.path.realpath(root or ".")
    real = os.path.realpath(path)
    if real != real_root and os.path.commonpath([real_root, real]) != real_root:
        raise ImagePathError(f"image path {rel!r} resolves to {real!r}, outside the image root {real_root!r}")
    return path


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
    """Decodes ``path`` (local or ``gs://``) fully and returns an RGB PIL image.

    Raises:
      ImageLoadError: the file is missing, unreadable, truncated, not an image, or a decompression
        bomb. The message names ``path``.
    """
    if storage.is_remote(path):
        try:
            data = storage.read_bytes(path)
        except OSError as e:  # FileNotFoundError and gcsfs's HTTP errors
            raise ImageLoadError(path, f"{type(e).__name__}: {e}") from e
        return decode_image(data, os.fspath(path))
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


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decodes image bytes fully and returns an RGB PIL image (what :func:`load_image` gives for a
    file with these bytes).

    Raises:
      ImageLoadError: naming ``name`` (the path or record the bytes came from) when the bytes are
        not a decodable image or are a decompression bomb.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as img:
                img.load()
                return to_rgb(img).copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise ImageLoadError(name, f"{type(e).__name__}: {e}") from e


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


@dataclasses.dataclass(frozen=True)
class PixelSpec:
    """How a vision tower wants its images (its HF image processor's settings).

    Attributes:
      size: output side in pixels.
      mean, std: per-channel normalisation on the [0, 1] scale (SigLIP: 0.5 / 0.5; CLIP: OpenAI's).
      center_crop: resize the shorter side to ``size`` and crop the centre square (CLIP's
        processor, LLaVA-1.5's stage 1); False = resize to the square (SigLIP's processor).
    """

    size: int
    mean: tuple[float, float, float] = SIGLIP_MEAN
    std: tuple[float, float, float] = SIGLIP_STD
    center_crop: bool = False


def _resize_and_crop(image: Image.Image, side: int, resample: int) -> Image.Image:
    """HF's ``shortest_edge`` resize (the longer side ``int(side * long / short)``) then its centre
    crop (``(extra) // 2`` from the top / left)."""
    w, h = image.size
    if w <= h:
        new_w, new_h = side, int(side * h / w)
    else:
        new_w, new_h = int(side * w / h), side
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=resample)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    return image.crop((left, top, left + side, top + side))


def preprocess_image(
    image: Image.Image | np.ndarray,
    size: int | Sequence[int],
    *,
    pad_to_square: bool = False,
    mean: Sequence[float] = SIGLIP_MEAN,
    std: Sequence[float] = SIGLIP_STD,
    resample: int = Image.Resampling.BICUBIC,
    center_crop: bool = False,
) -> np.ndarray:
    """Resizes and normalises one image for the vision tower.

    Args:
      image: a PIL image (any mode) or a uint8 array ``[h, w, 3]``.
      size: output side, or (height, width).
      pad_to_square: first pad to a square with the mean colour (:func:`expand_to_square`).
      mean, std: per-channel normalisation on the [0, 1] scale.
      resample: PIL filter; bicubic as HF's SigLIP and CLIP processors.
      center_crop: resize the shorter side to ``size`` and crop the centre (CLIP's processor);
        else resize to ``size`` directly (SigLIP's).

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
    if center_crop:
        if height != width:
            raise ValueError(f"center_crop needs a square size, got {height}x{width}")
        image = _resize_and_crop(image, height, resample)
    elif image.size != (width, height):
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
    center_crop: bool = False,
) -> np.ndarray:
    """:func:`load_image` then :func:`preprocess_image`: float32 ``[h, w, 3]``.

    Raises:
      ImageLoadError: naming ``path`` when it cannot be decoded.
    """
    return preprocess_image(load_image(path), size, pad_to_square=pad_to_square, mean=mean, std=std,
                            center_crop=center_crop)


def preprocess_for(spec: PixelSpec, image: Image.Image | np.ndarray, pad_to_square: bool = False) -> np.ndarray:
    """:func:`preprocess_image` with a tower's :class:`PixelSpec`."""
    return preprocess_image(image, spec.size, pad_to_square=pad_to_square, mean=spec.mean, std=spec.std,
                            center_crop=spec.center_crop)


def load_for(spec: PixelSpec, path: str | os.PathLike, pad_to_square: bool = False) -> np.ndarray:
    """:func:`load_and_preprocess` with a tower's :class:`PixelSpec`."""
    return preprocess_for(spec, load_image(path), pad_to_square)
