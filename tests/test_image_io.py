"""Tests for cmpt.vision.image_io.load_image: bad inputs and image modes (docs/method.md §4)."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pytest
from PIL import Image, ImageFile

from cmpt.vision.image_io import ImageLoadError, load_image
from cmpt.vision.processor import ImageProcessor
from processor_fixtures import textured

# ---------------------------------------------------------------- load_image: bad inputs (docs/method.md §4)


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _strict_truncation(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)


@pytest.mark.parametrize(
    ("fname", "data", "match"),
    [
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "corrupt"),
        ("noise.jpg", np.random.default_rng(0).bytes(3000), "not a recognized image"),
        ("trunc.png", _png_bytes(textured(64, 64, 0))[:700], "truncated"),
        ("trunc.jpg", _jpeg_bytes(textured(64, 64, 0))[:900], "truncated"),
        ("empty.jpg", b"", "empty"),
        ("page.jpg", b"<!DOCTYPE html><html><body>403 Forbidden</body></html>", "HTML"),
    ],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, fname, data, match):
    path = tmp_path / fname
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=match) as err:
        load_image(path)
    assert fname in str(err.value) and "drop the sample" in str(err.value)
    assert isinstance(err.value, ValueError)
    if data:
        with pytest.raises(ImageLoadError, match=r"sample-42"):
            load_image(data, name="sample-42")
    with pytest.raises(ImageLoadError, match=fname):
        ImageProcessor()([path])


def test_missing_file_and_zero_size_image(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing\.jpg.*check the path"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 0)), name="zero")
    with pytest.raises(ImageLoadError, match="zero size"):
        load_image(Image.new("RGB", (0, 7)))
    with pytest.raises(TypeError):
        load_image(12345)


def test_decompression_bomb_raises(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    textured(40, 40, 0).save(path)  # 1600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning zone (> limit)
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*decompression") as err:
        load_image(path)
    assert "MAX_IMAGE_PIXELS" in str(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # error zone (> 2x limit)
    with pytest.raises(ImageLoadError, match="decompression"):
        load_image(path.read_bytes(), name="bomb-bytes")


def test_extreme_aspect_ratio_raises_value_error_naming_the_image(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (5000, 1), (10, 20, 30)).save(path)
    assert load_image(path).size == (5000, 1)  # loading is fine; the resolution policy refuses it
    with pytest.raises(ValueError, match=r"strip\.png.*aspect ratio"):
        ImageProcessor()([path])


# ---------------------------------------------------------------- load_image: modes


def test_cmyk_jpeg_loads_to_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (32, 24), (0, 255, 255, 0)).save(path, quality=100)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 24)
    r, g, b = np.asarray(img).reshape(-1, 3).mean(0)
    assert r > 245 and g < 10 and b < 10


def test_16bit_grayscale_png_is_scaled(tmp_path):
    a = (np.arange(32 * 16, dtype=np.uint32).reshape(16, 32) * 128).astype(np.uint16)
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I;16")
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 16)
    want = np.floor(a / 257 + 0.5).astype(np.uint8)
    got = np.asarray(img)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 2], want)
    as_i = load_image(Image.fromarray(a.astype(np.int32)))  # mode "I"
    assert np.array_equal(np.asarray(as_i)[..., 1], want)


def test_transparency_is_composited_on_white(tmp_path):
    from transformers.image_transforms import convert_to_rgb

    # palette PNG with a transparent index
    pal = Image.new("P", (8, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    pal.putdata([0, 1] * 16)
    path = tmp_path / "pal.png"
    pal.save(path, transparency=0)
    got = np.asarray(load_image(path))
    assert (got[:, 0::2] == 255).all() and (got[:, 1::2] == [0, 0, 255]).all()
    # RGBA with partial alpha, LA, matching transformers' convert_to_rgb (>= 5.23; older ones drop alpha)
    hf_composites = "return_numpy" in inspect.signature(convert_to_rgb).parameters
    rgba = Image.fromarray(np.array([[[255, 0, 0, 128], [0, 255, 0, 0], [0, 0, 255, 255]]], dtype=np.uint8))
    la = Image.fromarray(np.array([[[100, 255], [100, 0], [50, 128]]], dtype=np.uint8), mode="LA")
    for im in (rgba, la):
        ours = np.asarray(load_image(_png_bytes(im), name="x"))
        if hf_composites:
            assert np.array_equal(ours, convert_to_rgb(im, return_numpy=True))
    assert np.asarray(load_image(rgba))[0, 1].tolist() == [255, 255, 255]
    assert np.abs(np.asarray(load_image(rgba))[0, 0].astype(int) - [255, 127, 127]).max() <= 1


def test_gray_and_bilevel_images():
    one = Image.new("1", (4, 2))
    one.putpixel((1, 0), 1)
    got = np.asarray(load_image(one))
    assert got.shape == (2, 4, 3) and got[0, 1].tolist() == [255] * 3 and got[0, 0].tolist() == [0] * 3
    assert np.asarray(load_image(Image.new("L", (3, 3), 77)))[1, 1].tolist() == [77] * 3


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored image rotated 90° clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, quality=100, exif=exif.tobytes())
    img = load_image(path)
    assert img.size == (20, 40)  # (W, H) swapped
    got = np.asarray(img).astype(int)
    assert got[:15, :, 0].mean() > 240 and got[:15, :, 2].mean() < 15  # left -> top: red
    assert got[25:, :, 2].mean() > 240 and got[25:, :, 0].mean() < 15  # right -> bottom: blue


def test_load_image_does_not_mutate_or_copy_rgb_input():
    img = textured(30, 30, 0)
    assert load_image(img) is img
    rgba = img.convert("RGBA")
    out = load_image(rgba)
    assert out.mode == "RGB" and rgba.mode == "RGBA"
