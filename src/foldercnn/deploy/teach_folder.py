"""The teaching folder: DATA_DIR's class folders, the captures the server writes into them, and the rules for
class names (a class name is a folder name on every system the folder may be copied to)."""

import json
import os
import stat
import threading
import unicodedata
from pathlib import Path

from ..data.captures import BURST, CAPTURE, capture_name, new_burst_id, parse_capture
from ..data.images import ImageDecodeError, is_candidate, load_rgb
from ..files import atomic_path, write_text
from .uploads import RequestRefused

MAX_NAME = 64
FORBIDDEN_IN_NAMES = set('/\\:*?"<>|')  # path separators, and what Windows cannot store in a folder name
# device names Windows will not give to a folder (with or without an extension)
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MIN_IMAGES_PER_CLASS = 5  # enough for one held-out image per class, and a head that is more than a guess
CAPTURE_SIDE = 1024  # captures are stored at most this large: plenty for any model input, small on disk
JPEG_QUALITY = 90


TeachError = RequestRefused  # a teach request the server refuses: an HTTP status and a reason for people


def check_class_name(name):
    """The class name as a folder name, or a TeachError saying what is wrong with it."""
    if not isinstance(name, str) or not name.strip():
        raise TeachError(400, "a class needs a name")
    if name != name.strip():
        raise TeachError(400, "a class name cannot start or end with spaces")
    if len(name) > MAX_NAME:
        raise TeachError(400, f"a class name has at most {MAX_NAME} characters")
    if name.startswith("."):
        raise TeachError(400, "a class name cannot start with a dot (hidden folders are not classes)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no file system or JSON answer can hold it
        raise TeachError(400, "a class name must be valid text (it holds an unpaired surrogate)") from None
    bad = sorted(
        {c for c in name if c in FORBIDDEN_IN_NAMES or ord(c) < 32 or ord(c) == 127 or unicodedata.category(c) == "Cf"}
    )
    if bad:
        shown = " ".join(ascii(c) if unicodedata.category(c) == "Cf" else repr(c) for c in bad)
        raise TeachError(400, f"a class name cannot contain {shown} (it names a folder)")
    if name != unicodedata.normalize("NFC", name):
        raise TeachError(
            400,
            "a class name must be in composed Unicode form (NFC): the same letters in another "
            "form would be another folder on Linux and the same one on macOS",
        )
    if name.split(".")[0].upper().rstrip() in WINDOWS_RESERVED or name.endswith("."):
        raise TeachError(400, f"'{name}' cannot name a folder on Windows (reserved device name, or a final dot)")
    return name


def folder_key(name):
    """Two class names that would be one folder on a case-insensitive file system (Windows, macOS)."""
    return unicodedata.normalize("NFC", name).casefold()


class TeachFolder:
    """DATA_DIR's class folders: list them, add one, save and delete captures. Safe to call from many threads."""

    def __init__(self, config):
        self.config = config
        self.root = config.data_dir
        self.on_change = None  # called after captures are saved or deleted (the warm worker's features follow)
        self.on_delete = None  # called with a capture's path just before it is deleted
        self._lock = threading.Lock()
        self.manifest = CaptureManifest(self.root, config.runs_dir)

    def _class_dir(self, name, must_exist=True):
        check_class_name(name)
        d = self.root / name
        if must_exist and not d.is_dir():
            raise TeachError(404, f"no class '{name}' in {self.root}")
        if d.exists() and d.resolve().parent != self.root.resolve():
            raise TeachError(
                409, f"the class folder '{name}' is a link to outside {self.root}; teaching writes only inside it"
            )
        return d

    def classes(self):
        """[{name, images, captures (newest first)}] for every class folder, sorted by name."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(
            (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name
        ):
            files = [f for f in d.rglob("*") if f.is_file() and is_candidate(f)]  # as training counts them
            captures = sorted(
                (f for f in files if parse_capture(f.name) and self.manifest.has(f)), key=_mtime, reverse=True
            )
            out.append(
                {
                    "name": d.name,
                    "images": len(files),
                    "captures": [f.stem for f in captures],
                    "bursts": len({parse_capture(f.name)[0] for f in captures}),
                    "other_images": len(files) - len(captures),
                }
            )
        return out

    def add_class(self, name):
        d = self._class_dir(name, must_exist=False)
        with self._lock:
            if d.is_dir():
                raise TeachError(409, f"the class '{name}' exists already")
            twin = (
                next(
                    (p.name for p in self.root.iterdir() if p.is_dir() and folder_key(p.name) == folder_key(name)), None
                )
                if self.root.is_dir()
                else None
            )
            if twin is not None:
                raise TeachError(
                    409,
                    f"the class '{name}' would be the same folder as '{twin}' on Windows and macOS "
                    "(names that differ only in case)",
                )
            if d.exists():
                raise TeachError(409, f"{d} exists and is not a folder")
            d.mkdir(parents=True)
        return {"name": name, "images": 0, "captures": [], "bursts": 0, "other_images": 0}

    def check_can_add(self, name, count):
        """Refuse `count` more images for the class when it does not exist or that would pass a cap."""
        self._class_dir(name)
        self._check_room(name, count)

    def _check_room(self, name, count):
        listed = {c["name"]: c["images"] for c in self.classes()}
        in_class, total = listed.get(name, 0), sum(listed.values())
        if in_class + count > self.config.max_per_class:
            raise TeachError(
                409,
                f"the class '{name}' is full: {in_class} images, at most "
                f"{self.config.max_per_class} per class (--teach-max-per-class)",
            )
        if total + count > self.config.max_images:
            raise TeachError(
                409,
                f"the teaching folder is full: {total} images, at most {self.config.max_images} "
                "in all (--teach-max-images)",
            )

    def save(self, name, images, burst=None):
        """Save decoded-and-checked uploads (list of bytes) as captures of one burst; returns their ids."""
        if burst is not None and not BURST.fullmatch(burst):
            raise TeachError(400, "burst: 1 to 24 lower-case letters or digits")
        burst = burst or new_burst_id()
        d = self._class_dir(name)
        pictures = [_capture_picture(data) for data in images]  # every upload is re-encoded before any is written
        ids = []
        with self._lock:
            self._check_room(name, len(pictures))
            number = max(
                (parse_capture(f.name)[1] for f in d.glob(f"cap-{burst}-*.jpg") if parse_capture(f.name)), default=0
            )
            for picture in pictures:
                number += 1
                path = d / capture_name(burst, number)
                with atomic_path(path) as tmp:
                    picture.save(tmp, format="JPEG", quality=JPEG_QUALITY)
                ids.append(path.stem)
                self.manifest.add(path)
        if self.on_change is not None:
            self.on_change()
        return {"class": name, "burst": burst, "ids": ids}

    def capture_path(self, name, image_id):
        """The file of one capture (only the server's own captures: never another file of the folder)."""
        d = self._class_dir(name)
        path = d / f"{image_id}.jpg"
        if not CAPTURE.fullmatch(path.name) or not _regular_file(path) or not self.manifest.has(path):
            raise TeachError(
                404, f"no capture '{image_id}' in class '{name}' (only images captured here can be shown or deleted)"
            )
        return path

    def delete(self, name, image_id):
        with self._lock:
            path = self.capture_path(name, image_id)
            if self.on_delete is not None:
                self.on_delete(path)
            path.unlink()
            self.manifest.remove(path)
        if self.on_change is not None:
            self.on_change()
        return {"class": name, "deleted": image_id}

    def check_trainable(self):
        """Refuse to start a job that cannot succeed, with what to do instead."""
        listed = self.classes()
        ready = [c for c in listed if c["images"] >= MIN_IMAGES_PER_CLASS]
        if len(listed) < 2:
            raise TeachError(409, "add at least two classes before training")
        short = [c["name"] for c in listed if c["images"] < MIN_IMAGES_PER_CLASS]
        if short:
            raise TeachError(
                409, f"every class needs at least {MIN_IMAGES_PER_CLASS} images; add more to: {', '.join(short)}"
            )
        return ready


def _regular_file(path):
    """A regular file, not a link (a link could point outside DATA_DIR), a FIFO, a socket or a device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


class CaptureManifest:
    """The captures this server wrote, by path relative to DATA_DIR, kept in the runs folder (never in DATA_DIR):
    a user's own file that happens to be named like a capture is never listed, shown or deleted as one."""

    def __init__(self, data_dir, runs_dir):
        self.data_dir, self.path = Path(data_dir), Path(runs_dir) / "captures.json"
        try:
            self.names = set(json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            self.names = set()

    def _key(self, path):
        return Path(path).relative_to(self.data_dir).as_posix()

    def has(self, path):
        return self._key(path) in self.names

    def add(self, path):
        self.names.add(self._key(path))
        self._write()

    def remove(self, path):
        self.names.discard(self._key(path))
        self._write()

    def _write(self):
        write_text(self.path, json.dumps(sorted(self.names)))


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _capture_picture(data):
    """Upload bytes -> the RGB picture to store: upright (EXIF applied), EXIF and other metadata dropped,
    at most CAPTURE_SIDE pixels on its longer side."""
    try:
        picture = load_rgb(data)
    except ImageDecodeError as e:
        raise TeachError(400, str(e)) from None
    picture.thumbnail((CAPTURE_SIDE, CAPTURE_SIDE))
    return picture
