"""S2 ("Scaling on Scales", Shi et al. 2024) multi-scale features for a fixed-size image tower.

This is the wrapper of the paper's CLIP-L@1008 rows, as LLaVA-S2 runs it (LLaVA's
``CLIPVisionTowerS2`` calling ``s2wrapper.forward(model, images, img_sizes=scales,
max_split_size=scales[0])``), re-implemented in JAX:

1. Preprocessing produces images at the *largest* scale (LLaVA-S2 sets the CLIP image
   processor's resize and crop to 1008 px), normalized as the tower expects.
2. For each scale s (sorted; the smallest is the base size B, e.g. 336), the normalized image is
   resized to s x s by ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)``
   (no antialiasing, computed in float32), reproduced to float32 rounding by :func:`resize_bicubic`.
3. The s x s image is cut into k x k tiles of B px (k = s / B), every tile goes through the tower
   (``tower_fn``: [N, B, B, 3] -> [N, g*g, d], prefix tokens already dropped), and the tiles'
   g x g feature grids are put back in place: one (g*k) x (g*k) grid.
4. That grid is area-interpolated back to g x g (``F.interpolate(mode="area")``; for the integer
   factor k this is the mean over k x k blocks, :func:`pool_area`).
5. The scales are concatenated on channels: [b, g*g, len(scales) * d], the smallest scale first.

Resize, JAX vs PyTorch. ``jax.image.resize(method="bicubic")`` is *not* the same resampling: it
uses Keys' cubic with a = -0.5 (PyTorch: -0.75), antialiases when downsampling (s2wrapper: no
antialias, so the 1008 -> 336 base image aliases), and renormalizes the weights at the borders
(PyTorch clamps the tap indices, i.e. repeats the edge pixel). :func:`resize_bicubic` builds
PyTorch's interpolation matrices on the host (source coordinates rounded to float32 as PyTorch's
CPU kernel does, weights in float64, stored as float32) and applies them as two matmuls at full
float32 precision; it matches ``F.interpolate`` to ~2e-6 on unit-variance images (the test
checks 1e-5, up to 336 -> 1008). Resizing to the same size is the identity in both.

Tile order. s2wrapper stacks tiles tile-major on the batch axis ([k*k*b]); here they are stacked
image-major ([b*k*k]) so a batch sharded over devices stays sharded without an all-to-all. The
tower treats every tile independently, so the result is the same.

Which features label the patches. SEA's labels should come from the *base scale* alone: the base
image through the tower, each final-layer patch token through post_layernorm and the projection
(``ImageEncoding.patch_embeds`` with ``patch_features="proj"``), as :func:`s2_encode` returns.
The concatenated S2 features cannot be used: they are hidden-layer features (pre-norm,
``len(scales) * width`` channels), not in CLIP's joint space, so they cannot be compared with
text embeddings. Of the per-scale passes only the base one shows the *whole* image at the size
CLIP was trained on; a larger scale's tile is a crop that the tower (CLS context, position
embeddings) sees as if it were a whole image, so its joint-space features describe the zoomed-in
crop, not the region's place in the scene. And the base grid is the S2 output grid: output token
i pools exactly the area of base patch i at every scale, so base label i names the region
visual token i encodes. The base image is the bicubic (aliased) resize of the large input, the
same pixels the base scale of S2 sees, so labels and features agree.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sea_jax.models.siglip import ImageEncoding

Array = jax.Array

# PyTorch's cubic convolution coefficient (aten UpSample.h, ``get_cubic_upsample_coefficients``).
_TORCH_CUBIC_A = -0.75


@dataclasses.dataclass(frozen=True)
class S2Config:
    """The scales of S2 (pixels per side), e.g. LLaVA-S2's ``(336, 672, 1008)``.

    The smallest scale is the base size: the tower's own image size, the tile size, and the
    size of the output grid. Every scale must be a multiple of it (s2wrapper would otherwise
    resize a second time to the next multiple and crop the features; not implemented).

    Attributes:
      scales: strictly increasing, each a multiple of ``scales[0]``.
      sequential: run the tiles of a scale one tile position at a time (``jax.lax.map`` over the
        k*k positions, a batch of b each; s2wrapper's ``split_forward``), trading speed for a
        k*k times smaller peak activation memory. Same result.
    """

    scales: tuple[int, ...] = (336, 672, 1008)
    sequential: bool = False

    def __post_init__(self):
        scales = tuple(int(s) for s in self.scales)
        object.__setattr__(self, "scales", scales)
        if not scales or scales[0] <= 0 or any(b <= a for a, b in itertools.pairwise(scales)):
            raise ValueError(f"scales must be positive and strictly increasing, got {scales}")
        bad = [s for s in scales if s % scales[0]]
        if bad:
            raise ValueError(f"scales {bad} are not multiples of the base size {scales[0]}")

    @property
    def base_size(self) -> int:
        """The tower's image size and the tile size (``scales[0]``)."""
        return self.scales[0]

    @property
    def image_size(self) -> int:
        """The size preprocessing should produce (``scales[-1]``, as LLaVA-S2 does)."""
        return self.scales[-1]

    @property
    def splits(self) -> tuple[int, ...]:
        """Tiles per side at each scale, k = scale / base_size."""
        return tuple(s // self.base_size for s in self.scales)

    def replace(self, **kw) -> S2Config:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **kw)


# ----------------------------------------------------------------------------------------------
# Resampling


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix of ``F.interpolate(mode="bicubic", align_corners=False,
    antialias=False)`` along one axis.

    Output i samples input coordinate (i + 0.5) * in/out - 0.5 (not clamped, as PyTorch does for
    cubic) with the four taps floor(c) - 1 .. floor(c) + 2; taps past an edge read the edge pixel.
    """
    # PyTorch (CPU, float32 images) takes the scale in float32 and rounds the coordinate to
    # float32 once. Near 1000 px the float32 spacing is 6e-5, so computing the coordinate in
    # float64, or with float32 rounding after the product too, moves the weights by up to 8e-5;
    # this reproduces PyTorch's weights to 1e-6.
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    c = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    lo = np.floor(c)
    t = (c - lo).astype(np.float64)
    m = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for j in range(-1, 3):
        idx = np.clip(lo.astype(np.int64) + j, 0, in_size - 1)
        np.add.at(m, (rows, idx), _cubic(t - j, _TORCH_CUBIC_A))
    return m.astype(np.float32)


def resize_bicubic(images: Array, size: int | tuple[int, int]) -> Array:
    """images [b, h, w, c] -> [b, H, W, c], PyTorch's bicubic (see :func:`bicubic_matrix`),
    computed in float32 and returned in the input dtype (as s2wrapper does). Same size: returned
    unchanged."""
    hh, ww = (size, size) if isinstance(size, int) else size
    h, w = images.shape[1:3]
    if (h, w) == (hh, ww):
        return images
    x = images.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST  # the default TPU matmul would round pixels to bfloat16
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(bicubic_matrix(h, hh)), x, precision=hi)
    x = jnp.einsum("pw,bowc->bopc", jnp.asarray(bicubic_matrix(w, ww)), x, precision=hi)
    return x.astype(images.dtype)


def pool_area(grid: Array, size: int) -> Array:
    """grid [b, H, W, d] -> [b, size, size, d] by ``F.interpolate(mode="area")`` for integer
    factors: the mean of each (H/size) x (W/size) block, in float32, returned in the input dtype."""
    b, h, w, d = grid.shape
    if h % size or w % size:
        raise ValueError(f"area pooling {h}x{w} to {size}x{size} needs integer factors")
    x = grid.astype(jnp.float32).reshape(b, size, h // size, size, w // size, d)
    return x.mean(axis=(2, 4)).astype(grid.dtype)


# ----------------------------------------------------------------------------------------------
# Tiles


def split_tiles(images: Array, k: int) -> Array:
    """images [b, k*s, k*s, c] -> tiles [b*k*k, s, s, c], image-major, tiles row-major
    (tile (i, j) of image n at index n*k*k + i*k + j)."""
    b, h, w, c = images.shape
    s = h // k
    if h != w or h % k:
        raise ValueError(f"images of {h}x{w} px do not split into {k}x{k} square tiles")
    x = images.reshape(b, k, s, k, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b * k * k, s, s, c)


def merge_tiles(tokens: Array, k: int) -> Array:
    """Inverse of :func:`split_tiles` on feature grids: tokens [b*k*k, g*g, d] (row-major g x g
    grid per tile) -> [b, k*g, k*g, d]."""
    n, gg, d = tokens.shape
    g = math.isqrt(gg)
    if g * g != gg or n % (k * k):
        raise ValueError(f"{n} tiles of {gg} tokens are not {k}x{k} tiles of square grids")
    b = n // (k * k)
    x = tokens.reshape(b, k, k, g, g, d).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, k * g, k * g, d)


def _run_tiles(tower_fn: Callable[[Array], Array], tiles: Array, b: int, k: int, sequential: bool) -> Array:
    """tower_fn over tiles [b*k*k, s, s, c] -> [b*k*k, n, d], in one batch or k*k batches of b."""
    if not sequential or k == 1:
        return tower_fn(tiles)
    per_pos = tiles.reshape(b, k * k, *tiles.shape[1:]).swapaxes(0, 1)  # [k*k, b, s, s, c]
    out = jax.lax.map(tower_fn, per_pos)  # [k*k, b, n, d]
    return out.swapaxes(0, 1).reshape(b * k * k, *out.shape[2:])


def scale_features(tower_fn: Callable[[Array], Array], images: Array, scale: int, cfg: S2Config) -> Array:
    """One scale of S2: images [b, h, w, 3] (any size) -> [b, g*g, d] on the base grid.

    Resize to ``scale`` (bicubic), split into k x k tiles of ``cfg.base_size``, run ``tower_fn``
    ([N, B, B, 3] -> [N, g*g, d]), merge the tiles' grids, area-pool back to g x g.
    """
    k = scale // cfg.base_size
    b = images.shape[0]
    x = resize_bicubic(images, scale)
    tokens = _run_tiles(tower_fn, split_tiles(x, k), b, k, cfg.sequential)
    grid = merge_tiles(tokens, k)
    g = grid.shape[1] // k
    return pool_area(grid, g).reshape(b, g * g, -1)


def s2_features(tower_fn: Callable[[Array], Array], images: Array, cfg: S2Config = S2Config()) -> Array:
    """S2 features: images [b, h, w, 3] -> [b, g*g, len(cfg.scales) * d].

    Args:
      tower_fn: maps images [N, B, B, 3] at the base size B to patch features [N, g*g, d] with
        any prefix (CLS) tokens already dropped, e.g. :func:`hidden_state_fn`.
      images: normalized images, normally at ``cfg.image_size`` (the largest scale), as LLaVA-S2
        preprocesses; any size is resized to each scale.
      cfg: the scales.
    Returns:
      Channel blocks in scale order: ``[..., i*d:(i+1)*d]`` is scale ``cfg.scales[i]``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [b, h, w, c], got {images.shape}")
    return jnp.concatenate([scale_features(tower_fn, images, s, cfg) for s in cfg.scales], axis=-1)


def base_images(images: Array, cfg: S2Config = S2Config()) -> Array:
    """The base-scale images S2 feeds the tower: images [b, h, w, 3] -> [b, B, B, 3] (bicubic,
    no antialias). What the labeller should see (module docstring)."""
    return resize_bicubic(images, cfg.base_size)


# ----------------------------------------------------------------------------------------------
# With a tower module


def hidden_state_fn(tower: Any, params: Any, layer: int = -2, num_prefix_tokens: int | None = None) -> Callable:
    """LLaVA's feature selection as a ``tower_fn``: images [N, B, B, 3] ->
    ``hidden_states[layer][:, num_prefix_tokens:]`` [N, g*g, width].

    Args:
      tower: an image tower module returning :class:`ImageEncoding` (CLIP's or SigLIP's).
      params: its parameters (the ``img`` subtree).
      layer: HF hidden-state index (-2: LLaVA-1.5's ``mm_vision_select_layer``).
      num_prefix_tokens: tokens to drop (default: ``tower.cfg.num_prefix_tokens``, else 0).
    """
    drop = getattr(tower.cfg, "num_prefix_tokens", 0) if num_prefix_tokens is None else num_prefix_tokens

    def fn(images: Array) -> Array:
        enc = tower.apply({"params": params}, images, hidden_states=False, keep_hidden=layer)
        return enc.hidden_states[layer][:, drop:]

    return fn


def s2_encode(
    tower: Any, params: Any, images: Array, cfg: S2Config = S2Config(), layer: int = -2,
    patch_features: str | None = None,
) -> tuple[Array, ImageEncoding]:
    """S2 features and the base-scale encoding from one base pass.

    images [b, h, w, 3] -> (features [b, g*g, len(scales) * width], base :class:`ImageEncoding`
    of ``base_images(images)``), where features are :func:`s2_features` with
    :func:`hidden_state_fn` (``layer``) and the base encoding's ``patch_embeds`` are the labels'
    features (module docstring). ``patch_features`` is passed to the tower.
    """
    drop = getattr(tower.cfg, "num_prefix_tokens", 0)
    base = tower.apply({"params": params}, base_images(images, cfg), patch_features=patch_features,
                       hidden_states=False, keep_hidden=layer)
    fn = hidden_state_fn(tower, params, layer, drop)
    feats = [base.hidden_states[layer][:, drop:]]
    feats += [scale_features(fn, images, s, cfg) for s in cfg.scales[1:]]
    return jnp.concatenate(feats, axis=-1), base
