"""Fetch and unpack the tutorial's zip files: progress bar, size check, safe extraction."""

import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from ..errors import FolderCNNError

MAX_UNPACKED_BYTES = 4 << 30  # refuse zip bombs


class DownloadError(FolderCNNError):
    pass


class OfflineError(DownloadError):
    """The server could not be reached at all (as opposed to a bad download)."""


def download(url, dest, timeout=30, progress=True):
    """Stream `url` to `dest` atomically; the byte count must equal the server's Content-Length."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise OfflineError(f"cannot reach {url} ({getattr(e, 'reason', e)})") from None
    expected = response.headers.get("Content-Length")
    expected = int(expected) if expected and expected.isdigit() else None
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    received = 0
    try:
        with (
            os.fdopen(fd, "wb") as f,
            response,
            tqdm(
                total=expected, unit="B", unit_scale=True, desc=f"downloading {dest.name}", disable=not progress
            ) as bar,
        ):
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, urllib.error.URLError) as e:  # includes http.client.IncompleteRead
                    raise DownloadError(f"download of {url} broke off after {received:,} bytes ({e})") from None
                if not chunk:
                    break
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DownloadError(f"download of {url} is incomplete: got {received:,} of {expected:,} bytes")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


def _member_target(root, info):
    name = info.filename
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or (len(parts[0]) >= 2 and parts[0][1] == ":"):
        raise DownloadError(f"unsafe path in zip: {name!r} would land outside the target folder")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise DownloadError(f"zip entry {name!r} is a symbolic link; refusing to extract")
    target = (root / Path(*parts)).resolve()
    if target != root and root not in target.parents:
        raise DownloadError(f"unsafe path in zip: {name!r} would land outside the target folder")
    return target


def safe_extract(zip_path, target):
    """Extract every entry below `target`, or nothing: entries escaping it, links and zip bombs are refused."""
    target = Path(target)
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{zip_path} is not a valid zip file ({e})") from None
    with zf:
        infos = [i for i in zf.infolist() if not i.filename.startswith("__MACOSX/")]
        if sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
            raise DownloadError(f"{zip_path} would unpack to more than {MAX_UNPACKED_BYTES >> 30} GiB; refusing")
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        root = staging.resolve()
        try:
            for info in infos:
                out = _member_target(root, info)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise DownloadError(f"{zip_path} is corrupt ({e})") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def fetch_zip(url, target, cache_dir, progress=True):
    """Download a zip into cache_dir and unpack it to `target` (the zip is removed afterwards)."""
    zip_path = Path(cache_dir) / Path(url).name
    download(url, zip_path, progress=progress)
    try:
        safe_extract(zip_path, target)
    finally:
        zip_path.unlink(missing_ok=True)
    return target
