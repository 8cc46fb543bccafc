"""The hands found in decoded images, kept on disk: one small float32 record per image, named by a hash of its
pixels and of the finder's version, so an image is searched once (hands.py searches; this remembers)."""

import contextlib
import hashlib
from pathlib import Path

import numpy as np

from ..files import atomic_path
from .hand_cascade import CASCADE

POINTS = 21  # MediaPipe Hands' landmarks per hand
RECORD = 4 + 2 * POINTS * 3  # stage, right, score, spare; points; world
CACHE_VERSION = 4  # bump when the cascade or the finder's settings change what is found (3, 4: onnxruntime finder)


def _record(found, i):
    r = np.zeros(RECORD, np.float32)
    r[:4] = found.stage[i], found.right[i], found.score[i], 0
    r[4 : 4 + POINTS * 3] = found.points[i].ravel()
    r[4 + POINTS * 3 :] = found.world[i].ravel()
    return r


def _from_record(found, i, r):
    found.stage[i], found.right[i], found.score[i] = int(r[0]), bool(r[1]), r[2]
    found.points[i] = r[4 : 4 + POINTS * 3].reshape(POINTS, 3)
    found.world[i] = r[4 + POINTS * 3 :].reshape(POINTS, 3)


RECORD_BYTES_MAX = 4096


def read_record(path):
    """A record's .npy file, its header checked before any data is read (a header may declare any shape)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        if path.stat().st_size > RECORD_BYTES_MAX:
            return None
        version = fmt.read_magic(f)
        read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        if shape != (RECORD,) or dtype != np.dtype("<f4") or fortran:
            return None
        data = f.read(RECORD * 4)
    return np.frombuffer(data, np.float32).copy() if len(data) == RECORD * 4 else None


def valid_record(r, stages=None):
    """A record as _record writes it: float32 (RECORD,), finite; a stage of the cascade or -1; a record without a
    hand all zeros; a hand's score a presence in [0.5, 1] and its points not all zero."""
    stages = len(CASCADE) if stages is None else stages
    if not (isinstance(r, np.ndarray) and r.shape == (RECORD,) and r.dtype == np.float32 and np.isfinite(r).all()):
        return False
    stage, right, score = float(r[0]), float(r[1]), float(r[2])
    if stage == -1:
        return not r[1:].any()
    return (
        stage.is_integer()
        and 0 <= stage < stages
        and right in (0.0, 1.0)
        and 0.5 <= score <= 1
        and bool(r[4:].any())
        and float(np.abs(r[4:]).max()) < 100
    )


def image_key(rgb):
    """The cache key of one decoded image: its pixels and the finder's version (never its file name)."""
    h = hashlib.sha256(f"foldercnn-hands-v{CACHE_VERSION}|{rgb.shape}\n".encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()[:32]


class HandCache:
    """Hands found per decoded image, one small .npy per image, named by its pixels' hash: a renamed, moved
    or re-captured image is found again for free, a changed one is looked at anew."""

    def __init__(self, root=None):
        from .cache import enabled, user_cache_dir

        self.root = None if not enabled() else Path(root or user_cache_dir() / "hands" / f"v{CACHE_VERSION}")

    def _path(self, key):
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key):
        if self.root is None:
            return None
        try:
            r = read_record(self._path(key))
        except (OSError, ValueError, EOFError, MemoryError):
            return None
        return r if valid_record(r) else None

    def put(self, key, record):
        if self.root is None:
            return
        with contextlib.suppress(OSError):  # a read-only cache only costs the search again
            with atomic_path(self._path(key)) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, record)
