"""Decode images from the wild into RGB uint8 arrays of one square size.

Every image the tool touches (training, evaluation, prediction) goes through `decode`,
so a model sees exactly the pixels at prediction time that it saw in training.
"""

import contextlib
import io
import os
import stat
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 80_000_000  # larger images are refused as possible decompression bombs
MAX_DEEP_SIDE = 4096  # 16- and 32-bit images are shrunk to this before becoming RGB (no model input is larger)
LARGE_PIXELS = 16_000_000  # images this large are decoded one at a time (each takes hundreds of MB)
_LARGE_DECODE = threading.Semaphore(1)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels


class ImageDecodeError(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


def is_candidate(path):
    """Files worth trying: visible, with an image extension."""
    name = Path(path).name
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def _open(source):
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        check_regular_file(source)
    return Image.open(source)


def check_regular_file(path):
    """Refuse what is not a regular file (a link to one is fine): opening a named pipe blocks for ever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise ImageDecodeError("is a directory")
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ImageDecodeError(f"not a regular file ({kind})")


def to_rgb(im):
    """Any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = Image.fromarray(_deep_to_uint8(im), "L")
        factor = -(-max(grey.size) // MAX_DEEP_SIDE)
        return (grey.reduce(factor) if factor > 1 else grey).convert("RGB")  # shrunk before tripling its bytes
    has_alpha = (
        im.mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (im.mode == "P" and "transparency" in im.info)
        or (im.mode in ("L", "RGB") and "transparency" in im.info)
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _deep_to_uint8(im, rows=256):
    """16- and 32-bit grey to 8 bits, a band of rows at a time: a float64 copy of a whole 8944 x 8944 image took
    the server from 340 MB to 2,360 MB (benchmarks/hostile.py)."""
    a = np.asarray(im)
    scale = 257.0 if im.mode != "F" and a.max(initial=0) > 255 else 1.0
    out = np.empty(a.shape, np.uint8)
    for r in range(0, a.shape[0], rows):
        out[r : r + rows] = np.clip(np.rint(a[r : r + rows].astype(np.float64) / scale), 0, 255)
    return out


def load_rgb(source, draft_size=None):
    """Open an image (path, bytes, or PIL image), apply EXIF orientation, return RGB.

    Raises ImageDecodeError with a short reason for anything unusable.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = _open(source)
            if im.width * im.height > MAX_PIXELS:
                raise ImageDecodeError(f"too many pixels ({im.width}x{im.height})")
            if im.width == 0 or im.height == 0:
                raise ImageDecodeError("image has zero size")
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))  # decode JPEGs at a reduced scale: much faster
            large = im.width * im.height >= LARGE_PIXELS
            with _LARGE_DECODE if large else contextlib.nullcontext():  # two at once doubled the server's peak
                im.load()  # GIF/TIFF: the first frame
                try:
                    im = ImageOps.exif_transpose(im)
                except Exception:  # a broken EXIF block must not lose an otherwise good image
                    pass
                return to_rgb(im)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory") from None
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageDecodeError("too many pixels (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError, KeyError) as e:
        text = str(e) or type(e).__name__
        if "truncated" in text:
            text = "truncated image file"
        raise ImageDecodeError(f"cannot decode: {text}") from None


class Letterbox(int):
    """An image size whose images keep their shape: shrunk (or grown) to fit size x size and centred on a square
    of their mean colour, where a plain size squashes them. Hand landmarks need it: a 3:2 photo squashed square
    lost 12 points of accuracy on green-screen (benchmarks/README.md). It is an int everywhere else."""

    mode = "letterbox"  # (it prints as the plain number, as an int does)


def fit_mode(size):
    return getattr(size, "mode", "squash")


def resize_square(im, size):
    """Squash to size x size (like Keras' target_size), or letterbox for a Letterbox size; bilinear with
    antialiasing when shrinking."""
    if isinstance(size, Letterbox):
        return letterbox(im, size)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return np.array(im, dtype=np.uint8)  # a writable copy


def letterbox(im, size):
    scale = size / max(im.size)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
    a = np.asarray(im, dtype=np.uint8)
    out = np.empty((size, size, 3), np.uint8)
    out[:] = a.reshape(-1, 3).mean(0).astype(np.uint8)
    top, left = (size - h) // 2, (size - w) // 2
    out[top : top + h, left : left + w] = a
    return out


def decode(source, size):
    """An image source to a (size, size, 3) uint8 RGB array."""
    if isinstance(source, np.ndarray):
        return resize_square(array_to_image(source), size)
    return resize_square(load_rgb(source, draft_size=size), size)


def array_to_image(a):
    """An HxW, HxWx1, HxWx3 or HxWx4 array (uint8, or float in [0, 1]) to a PIL RGB image."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.number):
            raise ImageDecodeError(f"unsupported array dtype {a.dtype}")
        a = np.clip(np.rint(a.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L").convert("RGB")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return to_rgb(Image.fromarray(a, "RGB" if a.shape[2] == 3 else "RGBA"))
    raise ImageDecodeError(f"unsupported array shape {a.shape}")
