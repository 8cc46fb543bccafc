"""Atomic file writes: a reader never sees a half-written file, a crash never leaves one."""

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import FolderCNNError, OptionError


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def check_out_dir(out_dir, data_dirs, flag="--out"):
    """Refuse an output folder inside a data folder (foldercnn never writes into the user's data)."""
    out = Path(out_dir).resolve()
    for d in data_dirs:
        if d is not None:
            d = Path(d).resolve()
            if out == d or d in out.parents:
                raise FolderCNNError(
                    f"the output folder {out_dir} is inside the data folder {d}; "
                    f"foldercnn never writes into your data. Choose another {flag}"
                )
    if out.exists() and not out.is_dir():
        raise OptionError(flag.lstrip("-").replace("-", "_"), f"{out_dir} exists and is not a folder")


def read_json(path):
    """The JSON in a file, or None when it is missing, unreadable, not JSON or too deeply nested."""
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None
