"""Decode cache: a folder's decoded uint8 images kept on disk as a memory-mapped .npy file.

The key covers the decoder version, the image size and every file's path, size and modification
time, so a changed, added or removed image gives a new key: a stale entry is never read. A new entry
for the same folder and size replaces the old one. Reading memory-maps the file, so a data set larger
than RAM is streamed from disk (the page cache keeps the hot part).
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..files import atomic_path

DECODER_VERSION = 1  # bump when decoding or resizing changes pixels


def user_cache_dir():
    """$FOLDERCNN_CACHE, else $XDG_CACHE_HOME/foldercnn, else ~/.cache/foldercnn."""
    if os.environ.get("FOLDERCNN_CACHE"):
        return Path(os.environ["FOLDERCNN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "foldercnn"


def enabled():
    return os.environ.get("FOLDERCNN_NO_CACHE", "") in ("", "0")


def folder_key(files, size):
    h = hashlib.sha256(f"foldercnn-decode-v{DECODER_VERSION}|{size}\n".encode())
    for f in files:
        try:
            st = os.stat(f)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:  # e.g. a broken symlink: decoding reports it as skipped
            stamp = "missing"
        h.update(f"{os.path.abspath(f)}\0{stamp}\n".encode())
    return h.hexdigest()[:32]


def _paths(key):
    d = user_cache_dir() / "decoded"
    return d / f"{key}.npy", d / f"{key}.json"


def load(key):
    """(memory-mapped (N, S, S, 3) uint8 array, good indices, [(index, reason)]) or None on a miss."""
    npy, meta = _paths(key)
    try:
        info = json.loads(meta.read_text())
        array = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
    except (OSError, ValueError):
        return None
    if array.shape[0] < len(info["good"]):
        return None
    return array[: len(info["good"])], info["good"], [tuple(b) for b in info["bad"]]


def new_array(key, shape):
    """A .npy memory map to decode into; `commit` makes it visible to `load`."""
    npy, _ = _paths(key)
    npy.parent.mkdir(parents=True, exist_ok=True)
    tmp = npy.with_name(f".{npy.name}.{os.getpid()}.tmp")
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape), tmp


def commit(key, array, tmp, good, bad, root, size):
    npy, meta = _paths(key)
    array.flush()
    del array
    os.replace(tmp, npy)
    with atomic_path(meta) as t:  # written last: its presence marks a complete entry
        Path(t).write_text(json.dumps({"root": str(Path(root).resolve()), "size": size, "good": good,
                                       "bad": [list(b) for b in bad]}))
    _drop_older_entries(key, root, size)


def _drop_older_entries(key, root, size):
    root = str(Path(root).resolve())
    for meta in (user_cache_dir() / "decoded").glob("*.json"):
        if meta.stem == key:
            continue
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if info.get("root") == root and info.get("size") == size:
            meta.unlink(missing_ok=True)
            meta.with_suffix(".npy").unlink(missing_ok=True)
