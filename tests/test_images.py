"""Images in the wild: every mode, EXIF orientation, and every kind of broken file."""

import io

import numpy as np
import pytest
from PIL import Image

from foldercnn.data.images import ImageDecodeError, decode, load_rgb


def save(tmp_path, im, name, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_rgba_is_composited_on_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent black
    out = decode(save(tmp_path, Image.fromarray(a, "RGBA"), "x.png"), 8)
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 7]) == (255, 255, 255)


def test_la_and_palette_transparency_on_white(tmp_path):
    la = Image.new("LA", (6, 6), (0, 0))
    assert tuple(decode(save(tmp_path, la, "la.png"), 6)[2, 2]) == (255, 255, 255)
    p = Image.new("P", (6, 6), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    path = save(tmp_path, p, "p.png", transparency=0)
    assert tuple(decode(path, 6)[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    "mode,value,expected", [("L", 100, (100, 100, 100)), ("1", 1, (255, 255, 255)), ("P", 0, (10, 20, 30))]
)
def test_grey_bilevel_palette_to_rgb(tmp_path, mode, value, expected):
    im = Image.new(mode, (5, 5), value)
    if mode == "P":
        im.putpalette([10, 20, 30] + [0] * 765)
    out = decode(save(tmp_path, im, f"{mode}.png"), 5)
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    assert tuple(out[2, 2]) == expected


def test_16_bit_grayscale_scaled_not_clipped(tmp_path):
    a = np.full((4, 4), 32896, np.uint16)  # 32896 / 257 = 128
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    out = decode(save(tmp_path, im, "g16.png"), 4)
    assert tuple(out[0, 0]) == (128, 128, 128)


def test_cmyk_jpeg_to_rgb(tmp_path):
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode(save(tmp_path, im, "c.jpg", quality=95), 16)
    r, g, b = out[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("ext", ["bmp", "webp", "tif", "jpg", "gif"])
def test_formats(tmp_path, ext):
    im = Image.new("RGB", (20, 10), (0, 128, 255))
    out = decode(save(tmp_path, im, f"x.{ext}"), 12)
    assert out.shape == (12, 12, 3)
    assert abs(int(out[6, 6, 2]) - 255) < 10


def test_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = decode(path, 8)[4, 4]
    assert r > 200 and b < 50


def test_exif_orientation_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)  # wide image, left half black, right half white
    a[:, 10:] = 255
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    im.save(path, exif=exif.tobytes(), quality=100)
    shown = load_rgb(path)
    assert shown.size == (10, 20)  # now tall
    arr = np.asarray(shown)
    assert arr[2, 5].mean() < 50 and arr[17, 5].mean() > 200  # black on top after rotating CW


def test_bytes_and_arrays_are_sources(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    assert tuple(decode(buf.getvalue(), 4)[0, 0]) == (1, 2, 3)
    assert decode(np.zeros((5, 7), np.uint8), 4).shape == (4, 4, 3)
    assert tuple(decode(np.ones((3, 3, 3), np.float32), 3)[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize(
    "content,reason",
    [
        (b"", "not an image"),
        (b"hello, not an image", "not an image"),
    ],
)
def test_garbage_files_rejected(tmp_path, content, reason):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(ImageDecodeError, match=reason):
        decode(p, 8)


def test_truncated_png_rejected(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "PNG")
    p = tmp_path / "trunc.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match="truncated|cannot decode"):
        decode(p, 8)


def test_decompression_bomb_rejected(tmp_path, monkeypatch):
    import foldercnn.data.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    p = save(tmp_path, Image.new("L", (100, 100)), "big.png")
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode(p, 8)
