"""Decode cache: a folder's decoded uint8 images kept on disk as a memory-mapped .npy file.

The key covers the decoder version, the image size and every file's path, size and modification
time, so a changed, added or removed image gives a new key: a stale entry is never read. A new entry
for the same folder and size replaces the old one. Reading memory-maps the file, so a data set larger
than RAM is streamed from disk (the page cache keeps the hot part).
"""

import hashlib
import json
import mmap
import os
import sys
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


def file_stamps(files):
    """Each file's size and modification time ("size:mtime_ns"; "missing" for one that cannot be stat'ed, e.g.
    a broken link, which decoding reports as skipped): read once per run, for this key and the checkpoint's."""
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append(f"{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append("missing")
    return out


def folder_key(files, size, stamps=None):
    mode = getattr(size, "mode", "squash")
    h = hashlib.sha256(f"foldercnn-decode-v{DECODER_VERSION}|{size}{'' if mode == 'squash' else mode}\n".encode())
    for f, stamp in zip(files, file_stamps(files) if stamps is None else stamps):
        # a name is bytes on POSIX, and need not be UTF-8: hashed as those bytes (os.fsencode), never re-encoded
        h.update(os.fsencode(os.path.abspath(f)) + f"\0{stamp}\n".encode())
    return h.hexdigest()[:32]


def _paths(key):
    d = user_cache_dir() / "decoded"
    return d / f"{key}.npy", d / f"{key}.json"


def load(key, size=None, n=None):
    """(memory-mapped (N, S, S, 3) uint8 array, good indices, [(index, reason)]) or None on a miss. With `size`
    and `n` (the key's image size and number of files) an entry that is not what `commit` writes for them is a
    miss too, said once on stderr, and decoding writes a good one over it."""
    npy, meta = _paths(key)
    try:
        info = json.loads(meta.read_text())
        array = np.load(npy, mmap_mode="c")  # copy-on-write: writable for torch, never written back
        # rows are read in random order: the kernel's read-around evicts needed pages under memory pressure
        # (benchmarks/scale.py); runs of rows are asked for explicitly instead (Readahead)
        if hasattr(mmap, "MADV_RANDOM"):
            array._mmap.madvise(mmap.MADV_RANDOM)
    except (OSError, ValueError, EOFError, MemoryError):
        return None
    problem = entry_problem(info, array, size, n)
    if problem:
        print(f"warning: decode cache entry {meta.name} {problem}: decoding again", file=sys.stderr)
        return None
    return array[: len(info["good"])], info["good"], [tuple(b) for b in info["bad"]]


def entry_problem(info, array, size=None, n=None):
    """Why a cache entry cannot be used (None: it can): its json's types, its rows, its images' size."""
    if not isinstance(info, dict) or not isinstance(info.get("good"), list) or not isinstance(info.get("bad"), list):
        return "is not an object with 'good' and 'bad' lists"
    good, bad = info["good"], info["bad"]
    if not all(type(i) is int for i in good) or not all(
        isinstance(b, list) and len(b) == 2 and type(b[0]) is int and isinstance(b[1], str) for b in bad
    ):
        return "lists something other than image indices and reasons"
    if n is not None and sorted(good + [b[0] for b in bad]) != list(range(n)):
        return f"does not account for the {n} files once each"
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[0] < len(good) or array.shape[3] != 3:
        return f"holds a {array.dtype} array of shape {array.shape}"
    if size is not None and array.shape[1:3] != (int(size), int(size)):
        return f"holds {array.shape[1]} x {array.shape[2]} images, not {int(size)} x {int(size)}"
    return None


class Readahead:
    """Asks the kernel to read rows of a cached array from disk before they are touched (posix_fadvise WILLNEED):
    a run of consecutive rows becomes one large read instead of a page fault per 4 KB page (the mapping is
    MADV_RANDOM, see `load`), and the next batch's rows are read while the current batch computes."""

    def __init__(self, path, offset, row_bytes):
        self.path, self.offset, self.row_bytes = str(path), int(offset), int(row_bytes)

    @classmethod
    def of(cls, array):
        """A Readahead for a memory-mapped cache array; None for an array in RAM or where fadvise is missing."""
        if not isinstance(array, np.memmap) or array.filename is None or not hasattr(os, "posix_fadvise"):
            return None
        return cls(array.filename, array.offset, array.strides[0])

    def __call__(self, rows):
        """rows: an iterable of row numbers, or a range."""
        runs = _runs(rows)
        if not runs:
            return
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            for first, count in runs:
                os.posix_fadvise(
                    fd, self.offset + first * self.row_bytes, count * self.row_bytes, os.POSIX_FADV_WILLNEED
                )
        except OSError:  # only a hint
            pass
        finally:
            os.close(fd)


def _runs(rows):
    """[(first, count)] of the runs of consecutive numbers in rows."""
    if isinstance(rows, range) and rows.step == 1:
        return [(rows.start, len(rows))] if len(rows) else []
    runs = []
    for r in sorted(set(rows)):
        if runs and runs[-1][0] + runs[-1][1] == r:
            runs[-1][1] += 1
        else:
            runs.append([r, 1])
    return [tuple(r) for r in runs]


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
        Path(t).write_text(
            json.dumps(
                {
                    "root": str(Path(root).resolve()),
                    "size": f"{size}{getattr(size, 'mode', '')}",
                    "good": good,
                    "bad": [list(b) for b in bad],
                }
            )
        )
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
        if (
            isinstance(info, dict)
            and info.get("root") == root
            and str(info.get("size")) == f"{size}{getattr(size, 'mode', '')}"
        ):
            meta.unlink(missing_ok=True)
            meta.with_suffix(".npy").unlink(missing_ok=True)
