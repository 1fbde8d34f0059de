"""A generated world of captioned images whose every patch has a known true word.

Each image: a grey textured background (stripes, checks, dots or noise, faintly tinted) and 1 to
``max_objects`` coloured shapes (distinct kinds and distinct colours within an image, so that every
question about "the circle" or "the red shape" has one answer), each small or large, placed so that
they do not overlap much. Everything about image ``i`` comes from ``np.random.default_rng([seed, i])``:
image ``i`` is the same whatever the number of images asked for, and the same on every machine.

Ground truth, for the alignment probe (``sea_jax.probe``): shapes are drawn on a ``supersample`` times finer
grid with hard edges, which gives an exact map of which object (or the background) each sub-pixel
shows; the image is that rendering box-filtered down (anti-aliased edges). For every ViT patch,
the label with the most sub-pixels wins (plurality; ties go to the topmost, i.e. latest drawn,
object), and the patch's true words are that object's kind and colour, or the background's word.

Text: a caption listing the objects left to right ("a small red circle and a large blue square on
stripes") for stage 1, and short multi-turn question/answer conversations for stage 2 ("what colour
is the circle?" -> "red", "how many shapes are there?" -> "two").
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

KINDS: tuple[str, ...] = ("square", "circle", "triangle", "star", "cross", "diamond")
# Saturated colours, far from each other and from the grey backgrounds (so colour is a patch-level
# cue a vision tower can pick up); each object's colour is jittered around these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 85, 225),
    "yellow": (235, 215, 40),
    "purple": (145, 55, 200),
    "orange": (245, 140, 30),
    "pink": (245, 120, 195),
}
BACKGROUNDS: tuple[str, ...] = ("stripes", "checks", "dots", "noise")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top", "bottom", "left", "right", "middle")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
# Words of the label vocabulary that never describe anything in this world: the word list of a
# real run is a dictionary, and the probe's nearest-word search must be able to miss.
DISTRACTORS: tuple[str, ...] = tuple(
    "dog cat horse bird fish tree flower grass leaf cloud sun moon sky water river sand snow rock hill road "
    "house door window table chair lamp book cup box bag hat shoe ball car boat train ship key clock bell "
    "apple bread".split())


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Geometry of the world. ``image_size`` must be a multiple of ``patch_size`` (the SigLIP
    patch), the truth grid is ``image_size // patch_size`` per side."""

    image_size: int = 64
    patch_size: int = 8
    max_objects: int = 3
    supersample: int = 4  # sub-pixels per pixel side, for anti-aliasing and exact truth
    pixel_noise: float = 6.0  # std of per-pixel noise (uint8 units) added after rendering
    small_radius: tuple[float, float] = (0.11, 0.15)  # object radius / image_size
    large_radius: tuple[float, float] = (0.18, 0.25)
    qa_turns: int = 3  # at most this many question/answer turns per conversation

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 1 <= self.max_objects <= min(len(KINDS), len(COLOURS), len(NUMBERS)):
            raise ValueError(f"max_objects must be in [1, {min(len(KINDS), len(COLOURS), len(NUMBERS))}]")
        if self.qa_turns < 1:
            raise ValueError("qa_turns must be at least 1")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def label_words() -> list[str]:
    """The word list of the demo: the words a patch can truly be (kinds, colours, backgrounds)
    first, then distractors. A patch's true word ids index this list.

    Size, position and number words are in the captions but not here: they describe a whole
    object or image, never what one patch shows. With them in the list, the tiny SigLIP gave
    "small" or "large" as the top label of nearly every patch (each caption has one of them, so
    their text embeddings sit near every image), and SEA faithfully taught the adapter that.
    """
    return [*KINDS, *COLOURS, *BACKGROUNDS, *DISTRACTORS]


WORD_ID = {w: i for i, w in enumerate(label_words())}


class Obj(NamedTuple):
    """One shape: kind, colour and size words, centre (x, y) and radius in pixels, drawn RGB."""

    kind: str
    colour: str
    size: str
    x: float
    y: float
    r: float
    rgb: tuple[int, int, int]


class Scene(NamedTuple):
    """What image ``index`` shows; objects in drawing order (later ones on top)."""

    index: int
    objects: tuple[Obj, ...]
    background: str
    bg_levels: tuple[float, float]  # the texture's two grey levels
    bg_tint: tuple[float, float, float]  # added to every background pixel
    bg_scale: float  # period (stripes), cell (checks), spacing (dots), blob size (noise), in pixels
    bg_angle: float  # stripes only, radians


class Sample(NamedTuple):
    """A rendered scene with its truth and text.

    image: uint8 [S, S, 3]. object_map: int32 [grid, grid], 0 = background, k = ``objects[k-1]``.
    coverage: float32 [grid, grid], share of the patch the winning label covers.
    shape_word / colour_word: int32 [grid, grid], ids into :func:`label_words` (the background's
    word where the background wins). conversation: ((question, answer), ...), the first question
    not yet carrying ``<image>`` (the LLaVA writer adds it).
    """

    scene: Scene
    image: np.ndarray
    object_map: np.ndarray
    coverage: np.ndarray
    shape_word: np.ndarray
    colour_word: np.ndarray
    caption: str
    conversation: tuple[tuple[str, str], ...]


# ----------------------------------------------------------------------------------------------
# Scenes


def make_scene(cfg: WorldConfig, rng: np.random.Generator, index: int) -> Scene:
    """Draws a scene: background, number of objects, then each object's kind, colour, size and a
    position that keeps it inside the image and apart from the others (rejection sampling; an
    object that finds no room after many tries is dropped, never squeezed in)."""
    s = float(cfg.image_size)
    n = int(rng.integers(1, cfg.max_objects + 1))
    kinds = rng.choice(len(KINDS), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    objects: list[Obj] = []
    for k, c in zip(kinds, colours):
        size = SIZES[int(rng.integers(len(SIZES)))]
        lo, hi = cfg.small_radius if size == "small" else cfg.large_radius
        r = float(rng.uniform(lo, hi)) * s
        for _ in range(100):
            x, y = rng.uniform(r, s - r, size=2)
            # centres at least 0.9 (r1 + r2) apart: shapes may touch at their corners, never hide
            if all(np.hypot(x - o.x, y - o.y) >= 0.9 * (r + o.r) for o in objects):
                break
        else:
            continue
        name = list(COLOURS)[int(c)]
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[name]) + rng.integers(-15, 16, size=3), 0, 255))
        objects.append(Obj(KINDS[int(k)], name, size, float(x), float(y), r, rgb))
    lo = float(rng.uniform(70, 130))
    levels = (lo, lo + float(rng.uniform(40, 70)))
    return Scene(
        index=index, objects=tuple(objects), background=BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))],
        bg_levels=levels, bg_tint=tuple(float(v) for v in rng.uniform(-12, 12, size=3)),
        bg_scale=float(rng.uniform(5.0, 11.0)), bg_angle=float(rng.choice([0.0, 0.25, 0.5, 0.75]) * np.pi),
    )


# ----------------------------------------------------------------------------------------------
# Rendering


def _polygon_mask(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test (vectorised over points): star shapes are not convex."""
    inside = np.zeros(x.shape, bool)
    for (x0, y0), (x1, y1) in zip(verts, np.roll(verts, -1, axis=0)):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < xc)
    return inside


def _regular(n: int, radius: float | Sequence[float], start: float = -np.pi / 2) -> np.ndarray:
    radii = np.resize(np.asarray(radius, float), n)
    ang = start + 2 * np.pi * np.arange(n) / n
    return np.stack([radii * np.cos(ang), radii * np.sin(ang)], -1)


def shape_mask(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Points (offsets from the centre, pixels) inside a shape of radius ``r``."""
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        h = 0.8 * r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if kind == "cross":
        w = 0.36 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "triangle":
        # pointing up, centred on its circumcircle, the base lowered so the shape fills its box
        return _polygon_mask(dx, dy - 0.15 * r, _regular(3, 1.15 * r))
    if kind == "star":
        return _polygon_mask(dx, dy, _regular(10, [r, 0.45 * r]))
    raise ValueError(f"unknown shape kind {kind!r}")


def _background(cfg: WorldConfig, scene: Scene, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The texture's grey level in [0, 1] at each (sub-pixel) point."""
    p = scene.bg_scale
    if scene.background == "stripes":
        u = x * np.cos(scene.bg_angle) + y * np.sin(scene.bg_angle)
        return (np.floor(u / (p / 2)) % 2).astype(np.float32)
    if scene.background == "checks":
        return ((np.floor(x / p) + np.floor(y / p)) % 2).astype(np.float32)
    if scene.background == "dots":
        gx, gy = x - (np.floor(x / p) + 0.5) * p, y - (np.floor(y / p) + 0.5) * p
        return (gx * gx + gy * gy <= (0.3 * p) ** 2).astype(np.float32)
    if scene.background == "noise":
        # smooth random field: coarse uniform noise, bilinearly interpolated
        cells = int(np.ceil(cfg.image_size / p)) + 2
        coarse = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
        fx, fy = x / p, y / p
        x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
        tx, ty = fx - x0, fy - y0
        top = coarse[y0, x0] * (1 - tx) + coarse[y0, x0 + 1] * tx
        bot = coarse[y0 + 1, x0] * (1 - tx) + coarse[y0 + 1, x0 + 1] * tx
        return top * (1 - ty) + bot * ty
    raise ValueError(f"unknown background {scene.background!r}")


def render(cfg: WorldConfig, scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 image [S, S, 3], int32 id map [S*ss, S*ss]: 0 background, k object k-1)."""
    ss = cfg.supersample
    n = cfg.image_size * ss
    coords = (np.arange(n, dtype=np.float32) + 0.5) / ss  # sub-pixel centres, in pixels
    x, y = np.meshgrid(coords, coords)
    g = _background(cfg, scene, x, y, rng)
    lo, hi = scene.bg_levels
    canvas = (lo + (hi - lo) * g)[..., None] + np.asarray(scene.bg_tint, np.float32)  # [n, n, 3]
    ids = np.zeros((n, n), np.int32)
    for k, o in enumerate(scene.objects, start=1):
        m = shape_mask(o.kind, x - o.x, y - o.y, o.r)
        canvas[m] = o.rgb
        ids[m] = k
    # box filter down to pixels, then sensor noise: anti-aliased edges, no two images alike
    img = canvas.reshape(cfg.image_size, ss, cfg.image_size, ss, 3).mean((1, 3))
    img = img + rng.normal(0, cfg.pixel_noise, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), ids


def patch_truth(cfg: WorldConfig, scene: Scene, ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """(object_map, coverage, shape_word, colour_word), each [grid, grid], from the sub-pixel id
    map: per patch the label covering the most sub-pixels (ties: the latest drawn object)."""
    g, side = cfg.grid, cfg.patch_size * cfg.supersample
    k = len(scene.objects) + 1
    blocks = ids.reshape(g, side, g, side).transpose(0, 2, 1, 3).reshape(g, g, side * side)
    counts = np.stack([(blocks == j).sum(-1) for j in range(k)], -1)  # [g, g, k]
    obj = (k - 1 - np.argmax(counts[..., ::-1], axis=-1)).astype(np.int32)  # ties -> highest id
    coverage = (np.take_along_axis(counts, obj[..., None], -1)[..., 0] / (side * side)).astype(np.float32)
    bg = WORD_ID[scene.background]
    shape_ids = np.asarray([bg] + [WORD_ID[o.kind] for o in scene.objects], np.int32)
    colour_ids = np.asarray([bg] + [WORD_ID[o.colour] for o in scene.objects], np.int32)
    return obj, coverage, shape_ids[obj], colour_ids[obj]


# ----------------------------------------------------------------------------------------------
# Text


def _phrase(o: Obj) -> str:
    return f"a {o.size} {o.colour} {o.kind}"


def caption(scene: Scene) -> str:
    """Objects left to right: a fixed grammar, so what the caption loss measures is whether the
    model read the image, not whether it guessed the phrasing."""
    objs = sorted(scene.objects, key=lambda o: o.x)
    names = [_phrase(o) for o in objs]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} on {scene.background}"


def position(cfg: WorldConfig, o: Obj) -> str:
    """'top left', 'right', 'middle', ...: the image cut in thirds each way."""
    third = cfg.image_size / 3
    v = "top" if o.y < third else "bottom" if o.y >= 2 * third else ""
    h = "left" if o.x < third else "right" if o.x >= 2 * third else ""
    return " ".join(p for p in (v, h) if p) or "middle"


def questions(cfg: WorldConfig, scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Every question the scene can answer unambiguously, one per kind of question, with its answer."""
    o = scene.objects[int(rng.integers(len(scene.objects)))]
    present = {x.kind for x in scene.objects}
    probe = str(rng.choice(KINDS)) if rng.random() < 0.5 else o.kind
    return [
        (f"what colour is the {o.kind}?", o.colour),
        (f"which shape is {o.colour}?", f"the {o.kind}"),
        ("how many shapes are there?", NUMBERS[len(scene.objects) - 1]),
        (f"is there a {probe}?", "yes" if probe in present else "no"),
        ("what is the background?", scene.background),
        (f"where is the {o.kind}?", position(cfg, o)),
        (f"is the {o.kind} small or large?", o.size),
        ("describe the image.", caption(scene)),
    ]


def conversation(cfg: WorldConfig, scene: Scene, rng: np.random.Generator) -> tuple[tuple[str, str], ...]:
    """1 to ``qa_turns`` distinct questions about the scene, in random order (multi-turn)."""
    pool = questions(cfg, scene, rng)
    n = int(rng.integers(1, cfg.qa_turns + 1))
    return tuple(pool[int(i)] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False))


# ----------------------------------------------------------------------------------------------
# The world


def sample(cfg: WorldConfig, seed: int, index: int) -> Sample:
    """Image ``index`` of the world ``seed``: scene, rendering, truth and text.

    A scene in which some object wins no patch (a small triangle straddling four patches) is drawn
    again from the same stream: the caption would name something no visual token shows.
    """
    rng = np.random.default_rng([int(seed), int(index)])
    for _ in range(50):
        scene = make_scene(cfg, rng, index)
        image, ids = render(cfg, scene, rng)
        obj, cov, shape_w, colour_w = patch_truth(cfg, scene, ids)
        if len(np.unique(obj[obj > 0])) == len(scene.objects):
            break
    else:
        raise RuntimeError(f"image {index}: no scene with every object visible at patch level; "
                           f"objects too small for patch {cfg.patch_size}?")
    return Sample(scene, image, obj, cov, shape_w, colour_w, caption(scene), conversation(cfg, scene, rng))


def corpus(cfg: WorldConfig) -> list[str]:
    """Text covering every word and phrase shape the world can produce (for the tokenizers):
    every question/answer template over every kind, colour and answer, and every caption phrase."""
    texts = [_phrase(Obj(k, c, s, 0, 0, 1, (0, 0, 0))) for k in KINDS for c in COLOURS for s in SIZES]
    texts += [f"{a} and {b} on {bg}" for a, b, bg in zip(texts, texts[1:] + texts[:1], BACKGROUNDS * len(texts))]
    for k in KINDS:
        for c in COLOURS:
            scene = Scene(0, (Obj(k, c, "small", 1, 1, 1, (0, 0, 0)),), BACKGROUNDS[0], (0, 0), (0, 0, 0), 1, 0)
            texts += [" ".join(qa) for qa in questions(cfg, scene, np.random.default_rng(len(texts)))]
    texts += [" ".join(NUMBERS), " ".join(POSITIONS), "top left top right bottom left bottom right yes no the"]
    return texts
