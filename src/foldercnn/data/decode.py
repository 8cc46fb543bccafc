"""Files to pixels, with numpy and Pillow only (no PyTorch): list the image files under a folder in natural
order, and decode many of them at once into one uint8 array. Used by training's folder scan and by the
torch-free ONNX predictor alike."""

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .images import ImageDecodeError, check_regular_file, decode, is_candidate


def natural_key(text):
    """Sort key where digit runs compare as numbers: "2" < "10", "img9" < "img10"."""
    return [int(part) if part.isdigit() else part.casefold() for part in re.split(r"(\d+)", text)]


def walk_images(folder, skipped):
    """Image files under `folder` (recursive, natural order); other files go to `skipped` with the reason."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted((d for d in dirnames if not d.startswith(".")), key=natural_key)
        for name in sorted(filenames, key=natural_key):
            path = Path(dirpath) / name
            if is_candidate(path):
                try:
                    check_regular_file(path)
                except ImageDecodeError as e:  # a pipe would block every reader: skipped like a hidden file
                    skipped.append((path, str(e)))
                    continue
                found.append(path)
            elif name.startswith("."):
                skipped.append((path, "hidden file"))
            else:
                skipped.append((path, f"not an image file extension ({path.suffix or 'none'})"))
    return found


def _decode_one(args):
    path, size = args
    try:
        return decode(path, size), None
    except ImageDecodeError as e:
        return None, str(e)
    except MemoryError:
        return None, "not enough memory to decode"


def decode_images(paths, size, workers=None, desc="decoding", out=None):
    """Decode many files with a thread pool (Pillow releases the GIL while decoding).

    Returns (array (N, S, S, 3) uint8 of the good ones, their indices, [(index, reason)] of the bad ones).
    `out`: a preallocated (len(paths), S, S, 3) array (e.g. a memory map) to decode into.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    if out is None:
        out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    good, bad = [], []
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_decode_one, ((p, size) for p in paths), chunksize=16)
        for i, (arr, reason) in enumerate(
            tqdm(results, total=len(paths), desc=desc, unit="img", leave=False, disable=None)
        ):
            if arr is None:
                bad.append((i, reason))
            else:
                out[len(good)] = arr
                good.append(i)
    return out[: len(good)], good, bad
