"""Teach from the camera: class folders that grow with captures, and training jobs that replace the served model.

`foldercnn serve MODEL --teach DATA_DIR` (or `foldercnn teach DATA_DIR`) adds this to the server (serve.py holds the
HTTP side). What it writes, and nothing else: new class folders and captures `cap-<burst>-<n>.jpg`
(data/captures.py) inside DATA_DIR, and one run folder per training job under the runs folder. It deletes only
captures it wrote. A training job is a real `foldercnn train` subprocess, run at a lower CPU priority so that the
server keeps answering; when it succeeds, the new model file is loaded and swapped in, and a failed job leaves the
old model serving.
"""
import json
import os
import stat
import subprocess
import unicodedata
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.captures import BURST, CAPTURE, capture_name, new_burst_id, parse_capture
from ..data.images import ImageDecodeError, is_candidate, load_rgb
from ..errors import FolderCNNError
from ..files import atomic_path, check_out_dir, write_text
from .. import run_folder as rf

MAX_NAME = 64
FORBIDDEN_IN_NAMES = set('/\\:*?"<>|')  # path separators, and what Windows cannot store in a folder name
# device names Windows will not give to a folder (with or without an extension)
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
MIN_IMAGES_PER_CLASS = 5  # enough for one held-out image per class, and a head that is more than a guess
CAPTURE_SIDE = 1024  # captures are stored at most this large: plenty for any model input, small on disk
JPEG_QUALITY = 90
LOG_LINES = 200
DEFAULT_RECIPE = "transfer"
# training stages, recognised by the start of `foldercnn train`'s log lines -> progress shown on the page
STAGES = (("validation:", 0.2, "decoded the images and held some out"), ("recipe '", 0.25, "training"),
          ("hands:", 0.4, "finding the hands"), ("landmark features:", 0.5, "fitting the head on the hand landmarks"),
          ("features:", 0.5, "fitting the head on the pretrained features"), ("head fitted", 0.65, "calibrating"),
          ("calibration", 0.75, "fitting the unfamiliarity score"), ("unfamiliarity", 0.85, "writing the report"),
          ("no unfamiliarity", 0.85, "writing the report"), ("report:", 0.95, "saving the model"))


class TeachError(Exception):
    """A teach request the server refuses: an HTTP status and a reason for people."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status, self.reason = status, reason


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
    bad = sorted({c for c in name if c in FORBIDDEN_IN_NAMES or ord(c) < 32 or ord(c) == 127
                  or unicodedata.category(c) == "Cf"})
    if bad:
        shown = " ".join(ascii(c) if unicodedata.category(c) == "Cf" else repr(c) for c in bad)
        raise TeachError(400, f"a class name cannot contain {shown} (it names a folder)")
    if name != unicodedata.normalize("NFC", name):
        raise TeachError(400, "a class name must be in composed Unicode form (NFC): the same letters in another "
                              "form would be another folder on Linux and the same one on macOS")
    if name.split(".")[0].upper().rstrip() in WINDOWS_RESERVED or name.endswith("."):
        raise TeachError(400, f"'{name}' cannot name a folder on Windows (reserved device name, or a final dot)")
    return name


def folder_key(name):
    """Two class names that would be one folder on a case-insensitive file system (Windows, macOS)."""
    return unicodedata.normalize("NFC", name).casefold()


@dataclass
class TeachConfig:
    data_dir: Path
    runs_dir: Path
    recipe: str = DEFAULT_RECIPE
    max_per_class: int = 1000
    max_images: int = 10000
    seed: int = 0
    train_args: tuple = ()  # more `foldercnn train` arguments (e.g. ("--epochs", "2"))

    def __post_init__(self):
        self.data_dir, self.runs_dir = Path(self.data_dir), Path(self.runs_dir)
        if self.max_per_class < 1 or self.max_images < 1:
            raise FolderCNNError("--teach-max-per-class and --teach-max-images must be at least 1")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise FolderCNNError(f"--teach {self.data_dir} is not a folder")
        check_out_dir(self.runs_dir, [self.data_dir])
        from ..training.recipes import get_recipe  # refuses an unknown recipe before anything listens
        get_recipe(self.recipe)


class TeachFolder:
    """DATA_DIR's class folders: list them, add one, save and delete captures. Safe to call from many threads."""

    def __init__(self, config):
        self.config = config
        self.root = config.data_dir
        self._lock = threading.Lock()
        self.manifest = CaptureManifest(self.root, config.runs_dir)

    def _class_dir(self, name, must_exist=True):
        check_class_name(name)
        d = self.root / name
        if must_exist and not d.is_dir():
            raise TeachError(404, f"no class '{name}' in {self.root}")
        if d.exists() and d.resolve().parent != self.root.resolve():
            raise TeachError(409, f"the class folder '{name}' is a link to outside {self.root}; "
                                  "teaching writes only inside it")
        return d

    def classes(self):
        """[{name, images, captures (newest first)}] for every class folder, sorted by name."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name):
            files = [f for f in d.rglob("*") if f.is_file() and is_candidate(f)]  # as training counts them
            captures = sorted((f for f in files if parse_capture(f.name) and self.manifest.has(f)), key=_mtime,
                              reverse=True)
            out.append({"name": d.name, "images": len(files), "captures": [f.stem for f in captures],
                        "bursts": len({parse_capture(f.name)[0] for f in captures}),
                        "other_images": len(files) - len(captures)})
        return out

    def add_class(self, name):
        d = self._class_dir(name, must_exist=False)
        with self._lock:
            if d.is_dir():
                raise TeachError(409, f"the class '{name}' exists already")
            twin = next((p.name for p in self.root.iterdir() if p.is_dir() and folder_key(p.name) == folder_key(name)),
                        None) if self.root.is_dir() else None
            if twin is not None:
                raise TeachError(409, f"the class '{name}' would be the same folder as '{twin}' on Windows and macOS "
                                      "(names that differ only in case)")
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
            raise TeachError(409, f"the class '{name}' is full: {in_class} images, at most "
                                  f"{self.config.max_per_class} per class (--teach-max-per-class)")
        if total + count > self.config.max_images:
            raise TeachError(409, f"the teaching folder is full: {total} images, at most {self.config.max_images} "
                                  "in all (--teach-max-images)")

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
            number = max((parse_capture(f.name)[1] for f in d.glob(f"cap-{burst}-*.jpg")
                          if parse_capture(f.name)), default=0)
            for picture in pictures:
                number += 1
                path = d / capture_name(burst, number)
                with atomic_path(path) as tmp:
                    picture.save(tmp, format="JPEG", quality=JPEG_QUALITY)
                ids.append(path.stem)
                self.manifest.add(path)
        return {"class": name, "burst": burst, "ids": ids}

    def capture_path(self, name, image_id):
        """The file of one capture (only the server's own captures: never another file of the folder)."""
        d = self._class_dir(name)
        path = d / f"{image_id}.jpg"
        if not CAPTURE.fullmatch(path.name) or not _regular_file(path) or not self.manifest.has(path):
            raise TeachError(404, f"no capture '{image_id}' in class '{name}' (only images captured here can be "
                                  "shown or deleted)")
        return path

    def delete(self, name, image_id):
        with self._lock:
            path = self.capture_path(name, image_id)
            path.unlink()
            self.manifest.remove(path)
        return {"class": name, "deleted": image_id}

    def check_trainable(self):
        """Refuse to start a job that cannot succeed, with what to do instead."""
        listed = self.classes()
        ready = [c for c in listed if c["images"] >= MIN_IMAGES_PER_CLASS]
        if len(listed) < 2:
            raise TeachError(409, "add at least two classes before training")
        short = [c["name"] for c in listed if c["images"] < MIN_IMAGES_PER_CLASS]
        if short:
            raise TeachError(409, f"every class needs at least {MIN_IMAGES_PER_CLASS} images; "
                                  f"add more to: {', '.join(short)}")
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


@dataclass
class Job:
    """One training job, as GET /teach/train/{id} shows it."""
    id: str
    run_dir: Path
    state: str = "running"  # running -> done | failed
    stage: str = "starting"
    progress: float = 0.0
    started: float = field(default_factory=time.time)
    seconds: float | None = None
    log: list = field(default_factory=list)
    error: str | None = None
    result: dict | None = None

    def to_dict(self):
        elapsed = self.seconds if self.seconds is not None else time.time() - self.started
        return {"id": self.id, "state": self.state, "stage": self.stage, "progress": round(self.progress, 3),
                "seconds": round(elapsed, 2), "run_dir": str(self.run_dir), "error": self.error,
                "result": self.result, "log_tail": self.log[-8:]}


class Teacher:
    """The folder and its training jobs (one at a time). `swap(model_path)` is called with the new model file
    when a job succeeds; it loads the model and puts it in service (an exception there fails the job)."""

    def __init__(self, config, swap):
        self.config, self.swap = config, swap
        self.folder = TeachFolder(config)
        self.jobs = {}
        self._lock = threading.Lock()
        self._process = None

    def current(self):
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def job(self, job_id):
        if job_id not in self.jobs:
            raise TeachError(404, f"no training job '{job_id}'")
        return self.jobs[job_id]

    def start(self):
        """Start a training job on DATA_DIR; 409 while another runs or when the folder is not ready."""
        with self._lock:
            running = self.current()
            if running is not None:
                raise TeachError(409, f"a training job is running ({running.id}); wait for it to finish")
            self.folder.check_trainable()
            job = Job(id=new_burst_id(), run_dir=self._new_run_dir())
            self.jobs[job.id] = job
            for old in list(self.jobs)[:-20]:  # keep the 20 most recent jobs
                del self.jobs[old]
        threading.Thread(target=self._run, args=(job,), name=f"foldercnn-teach-{job.id}", daemon=True).start()
        return job

    def _new_run_dir(self):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(1000):
            d = self.config.runs_dir / (f"teach-{stamp}" + (f"-{k}" if k else ""))
            if not d.exists():
                return d
        raise TeachError(500, f"no free run folder name in {self.config.runs_dir}")

    def command(self, run_dir):
        return [sys.executable, "-m", "foldercnn", "train", str(self.config.data_dir), "--recipe",
                self.config.recipe, "--out", str(run_dir), "--seed", str(self.config.seed), "--restart",
                *self.config.train_args]

    def _run(self, job):
        try:
            code = self._train(job)
            if code != 0:
                job.error = _failure_reason(job.log, code)
                job.state = "failed"
                return
            job.stage, job.progress = "loading the new model", 0.97
            model_path = job.run_dir / rf.MODEL
            self.swap(model_path)
            job.result = job_result(model_path, self.folder.classes())
            job.state, job.stage, job.progress = "done", "serving the new model", 1.0
        except Exception as e:  # the old model keeps serving; the page says why
            job.error = str(e) if isinstance(e, FolderCNNError) else f"{type(e).__name__}: {e}"
            job.state = "failed"
        finally:
            job.seconds = time.time() - job.started

    def _train(self, job):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(self.command(job.run_dir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, errors="replace", env=env)
        self._process = process
        try:  # below the server's priority: /predict keeps its latency while a job trains
            os.setpriority(os.PRIO_PROCESS, process.pid, 10)
        except (AttributeError, OSError):
            pass
        for line in process.stdout:
            line = line.rstrip()
            if not line or line.startswith((" ", "-", "=", "_", "Layer", "Total", "Trainable", "Non-trainable")):
                continue  # the model summary table: no news
            job.log = (job.log + [line])[-LOG_LINES:]
            _advance(job, line)
        return process.wait()

    def stop(self):
        """Server shutdown: end a running job's subprocess (its run folder keeps what it wrote)."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


def _advance(job, line):
    for prefix, progress, stage in STAGES:
        if line.startswith(prefix) and progress > job.progress:
            job.progress, job.stage = progress, stage
    if line.startswith("epoch "):  # the training loop's recipes (not the linear probe): "epoch  3/12 ..."
        try:
            done, total = line.split()[1].split("/")
            job.progress = max(job.progress, 0.25 + 0.45 * int(done) / int(total))
            job.stage = f"training: epoch {int(done)} of {int(total)}"
        except ValueError:
            pass


def _failure_reason(log, code):
    errors = [line.split("error:", 1)[1].strip() for line in log if line.startswith("foldercnn: error:")]
    if errors:
        return errors[-1]
    tail = " | ".join(log[-3:]) if log else "no output"
    return f"training stopped with exit code {code}: {tail}"


def job_result(model_path, classes):
    """What the page shows after a job: held-out accuracy on the captures and how far to trust it."""
    from ..models.file import read_metadata
    meta = read_metadata(model_path)
    metrics = meta["metrics"]
    single = [c["name"] for c in classes if c["bursts"] < 2 and c["other_images"] == 0]
    note = None
    if single:
        note = (f"{', '.join(single)}: recorded in a single burst, so held-out frames have near-twins in training "
                "and the accuracy flatters; record two or more bursts per class (other moments, places, hands)")
    return {"model": str(model_path), "report": str(Path(model_path).parent / rf.REPORT),
            "val_accuracy": metrics["val_accuracy"], "n_val": metrics["n_val"], "n_train": metrics["n_train"],
            "classes": meta["classes"], "train_seconds": meta["timing"]["train_seconds"],
            "data_seconds": meta["timing"]["data_seconds"], "note": note}
