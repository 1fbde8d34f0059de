"""Image preprocessing: parity with transformers' SigLIP image processor, LLaVA's pad-to-square,
and clear errors for unreadable files."""
import zlib

import numpy as np
import pytest
from PIL import Image

from sea_jax.data import images

from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil


def _noise_image(rng, height, width, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    # Smooth structure plus noise, so the bicubic filter sees gradients and edges, not only noise.
    yy, xx = np.mgrid[0:height, 0:width]
    arr = (arr // 2 + ((xx * 3 + yy * 5) % 128)[..., None]).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr)


def _hf(image, size, **kw):
    proc = SiglipImageProcessorPil(size={"height": size, "width": size}, **kw)
    out = proc(images=image, return_tensors="np")["pixel_values"][0]
    return np.transpose(out, (1, 2, 0))  # CHW -> HWC


@pytest.mark.parametrize(
    "hw,size,mode",
    [((37, 53), 32, "RGB"), ((64, 48), 32, "RGB"), ((20, 20), 48, "RGB"), ((40, 30), 24, "L"),
     ((33, 41), 28, "RGBA")],
)
def test_matches_hf_siglip_processor(hw, size, mode):
    rng = np.random.default_rng(zlib.crc32(repr((hw, size, mode)).encode()))
    img = _noise_image(rng, *hw, mode=mode)
    ours = images.preprocess_image(img, size)
    ref = _hf(img, size)
    assert ours.dtype == np.float32 and ours.shape == (size, size, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert ours.min() >= -1.0 and ours.max() <= 1.0


def test_rgba_is_composited_on_white():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 200  # red under a fully transparent alpha: must not leak through
    rgb = images.to_rgb(Image.fromarray(arr))
    assert np.all(np.asarray(rgb) == 255)


def test_expand_to_square_matches_llava_rule():
    rng = np.random.default_rng(0)
    img = _noise_image(rng, 10, 16)  # wide: pad top/bottom by 3
    sq = images.expand_to_square(img, (127, 127, 127))
    out = np.asarray(sq)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out[3:13], np.asarray(img))
    assert np.all(out[:3] == 127) and np.all(out[13:] == 127)
    tall = _noise_image(rng, 15, 8)  # tall: pad left by (15-8)//2 = 3, right by 4
    out = np.asarray(images.expand_to_square(tall, (1, 2, 3)))
    np.testing.assert_array_equal(out[:, 3:11], np.asarray(tall))
    assert np.all(out[:, :3] == (1, 2, 3)) and np.all(out[:, 11:] == (1, 2, 3))
    assert images.expand_to_square(_noise_image(rng, 9, 9), (0, 0, 0)).size == (9, 9)


def test_pad_to_square_then_processor_equals_hf_on_padded():
    rng = np.random.default_rng(1)
    img = _noise_image(rng, 30, 50)
    assert images.mean_fill_colour() == (127, 127, 127)
    ours = images.preprocess_image(img, 32, pad_to_square=True)
    ref = _hf(images.expand_to_square(img, (127, 127, 127)), 32)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    # the padding rows are the mean colour: (127/255 - .5)/.5, away from the bicubic seam
    np.testing.assert_allclose(ours[0, 16], (127 / 255 - 0.5) / 0.5, atol=1e-6)


def test_load_and_preprocess_file(tmp_path):
    rng = np.random.default_rng(2)
    img = _noise_image(rng, 21, 19)
    path = tmp_path / "a.png"
    img.save(path)
    out = images.load_and_preprocess(path, 16)
    np.testing.assert_allclose(out, _hf(img, 16), atol=1e-5, rtol=0)
    # a JPEG in another mode goes through the same RGB conversion
    _noise_image(rng, 12, 12, "L").save(tmp_path / "g.jpg")
    assert images.load_and_preprocess(tmp_path / "g.jpg", 8).shape == (8, 8, 3)


def test_bad_files_raise_naming_the_path(tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    with pytest.raises(images.ImageLoadError, match="garbage.png"):
        images.load_image(garbage)
    # a truncated PNG: a valid header, the data cut short
    good = tmp_path / "good.png"
    _noise_image(np.random.default_rng(3), 40, 40).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(images.ImageLoadError, match="truncated.png"):
        images.load_image(truncated)
    with pytest.raises(images.ImageLoadError, match="missing.jpg"):
        images.load_image(tmp_path / "missing.jpg")


def test_array_input_validation():
    with pytest.raises(ValueError, match="uint8"):
        images.preprocess_image(np.zeros((4, 4, 3), np.float32), 4)
    arr = np.random.default_rng(4).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        images.preprocess_image(arr, (6, 7)), images.preprocess_image(Image.fromarray(arr), (6, 7))
    )
