"""Features of a frozen pretrained backbone, kept on disk per image file: one small safetensors file per file
content (sha256 of its bytes), under a folder named by the backbone and its input, so a renamed or moved file
costs nothing and a changed one is computed anew. What a record holds: the pooled features of the image and of
its mirror image (float32; a hand-landmarks store keeps the hand found and no mirror image), and a THUMB-pixel
thumbnail (uint8) for the near-duplicate check of the split."""

import contextlib
import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ..files import atomic_path, write_text

STORE_VERSION = 1  # bump when what a record holds, or how it is computed, changes
THUMB = 48  # the near-duplicate check shrinks to 16 px and crops from 48 px (data/duplicates.py)
DESCRIPTION = "store.json"


def backbone_key(architecture, arch_args, image_size, mean, std, fit, finder=None):
    """The folder name of one backbone's features: everything that changes them, hashed (finder: how a
    hand-landmarks store's hands are found)."""
    described = {
        "version": STORE_VERSION,
        "architecture": architecture,
        "arch_args": arch_args,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "fit": fit,
    }
    if finder is not None:
        described["finder"] = finder
    text = json.dumps(described, sort_keys=True)
    return f"{architecture}-{hashlib.sha256(text.encode()).hexdigest()[:12]}", described


class FeatureStore:
    """Records by file digest: get, put, drop; a record that cannot be read is treated as missing."""

    def __init__(self, root, described=None):
        self.root, self.described = Path(root), described  # nothing is written before the first record

    def _describe(self):
        if self.described is not None and not (self.root / DESCRIPTION).exists():
            with contextlib.suppress(OSError):
                write_text(self.root / DESCRIPTION, json.dumps(self.described, indent=1) + "\n")

    def _path(self, digest):
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, digest, dim=None):
        """{"clean": (D,), "flip": (D,) (where one was kept), "thumb": (THUMB, THUMB, 3)} or None."""
        try:
            record = load_file(self._path(digest))
        except (OSError, SafetensorError, ValueError):
            return None
        clean, flip, thumb = record.get("clean"), record.get("flip", record.get("clean")), record.get("thumb")
        if clean is None or thumb is None or clean.shape != flip.shape or clean.ndim != 1:
            return None
        if (dim is not None and clean.shape[0] != dim) or thumb.shape != (THUMB, THUMB, 3):
            return None
        if not (np.isfinite(clean).all() and np.isfinite(flip).all()):
            return None
        return record

    def put(self, digest, clean, flip, thumb):
        """flip None: a record without a mirror image's features."""
        record = {"clean": np.ascontiguousarray(clean, np.float32), "thumb": np.ascontiguousarray(thumb, np.uint8)}
        if flip is not None:
            record["flip"] = np.ascontiguousarray(flip, np.float32)
        with contextlib.suppress(OSError):  # a full or read-only disk only costs computing them again
            with atomic_path(self._path(digest)) as tmp:
                save_file(record, str(tmp))
            self._describe()

    def drop(self, digest):
        with contextlib.suppress(OSError):
            self._path(digest).unlink()

    def __contains__(self, digest):
        return self._path(digest).is_file()

    def size_bytes(self):
        return sum(p.stat().st_size for p in self.root.glob("*/*.safetensors"))

    def __len__(self):
        return sum(1 for _ in self.root.glob("*/*.safetensors"))
