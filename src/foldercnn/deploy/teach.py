"""Teach from the camera: class folders that grow with captures, and training jobs that replace the served model.

`foldercnn serve MODEL --teach DATA_DIR` (or `foldercnn teach DATA_DIR`) adds this to the server (serve.py holds the
HTTP side). What it writes, and nothing else: new class folders and captures `cap-<burst>-<n>.jpg`
(data/captures.py) inside DATA_DIR, and one run folder per training job under the runs folder. It deletes only
captures it wrote. With a recipe whose features depend on each image alone (the default `probe`, and `hands`:
training/cached_probe.py), a warm worker process (teach_worker.py) keeps the backbone (or MediaPipe Hands) loaded
and computes each capture's features (or finds its hand) as it arrives, so a training job only fits the head; with
any other recipe a job is a real `foldercnn train` subprocess. Both run at a lower CPU priority so that the server
keeps answering; when a job succeeds, the new model file is loaded and swapped in, and a failed job leaves the old
model serving.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import run_folder as rf
from ..data.captures import new_burst_id
from ..errors import FolderCNNError, OptionError
from ..events import read_event
from ..files import check_out_dir
from .teach_folder import MIN_IMAGES_PER_CLASS, TeachError, TeachFolder, check_class_name  # noqa: F401 (API)
from .teach_worker import keep_tail

LOG_LINES = 200
DEFAULT_RECIPE = "probe"


@dataclass
class TeachConfig:
    data_dir: Path
    runs_dir: Path
    recipe: str = DEFAULT_RECIPE
    max_per_class: int = 1000
    max_images: int = 10000
    seed: int = 0
    train_args: tuple = ()  # more `foldercnn train` arguments (e.g. ("--epochs", "2")): jobs are then subprocesses
    warm: bool = True  # a warm worker with features kept per capture, where the recipe allows (warm_worker)

    def __post_init__(self):
        self.data_dir, self.runs_dir = Path(self.data_dir), Path(self.runs_dir)
        if self.max_per_class < 1 or self.max_images < 1:
            raise OptionError("max_per_class" if self.max_per_class < 1 else "max_images", "must be at least 1")
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise OptionError("data_dir", f"{self.data_dir} is not a folder")
        check_out_dir(self.runs_dir, [self.data_dir])
        from ..training.recipes import get_recipe  # refuses an unknown recipe before anything listens

        get_recipe(self.recipe)


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
    served_seconds: float | None = None  # from Train to the new model serving (the report is written after)

    def to_dict(self):
        elapsed = self.seconds if self.seconds is not None else time.time() - self.started
        return {
            "id": self.id,
            "state": self.state,
            "stage": self.stage,
            "progress": round(self.progress, 3),
            "seconds": round(elapsed, 2),
            "served_seconds": None if self.served_seconds is None else round(self.served_seconds, 2),
            "run_dir": str(self.run_dir),
            "error": self.error,
            "result": self.result,
            "log_tail": self.log[-8:],
        }


class Teacher:
    """The folder and its training jobs (one at a time). `swap(model_path)` is called with the new model file
    when a job succeeds; it loads the model and puts it in service (an exception there fails the job)."""

    def __init__(self, config, swap):
        self.config, self.swap = config, swap
        self.folder = TeachFolder(config)
        self.jobs = {}
        self._lock = threading.Lock()
        self._process = None
        self.worker = warm_worker(config)
        self.estimate = None  # the latest leave-one-burst-out estimate per class (warm worker only)
        self.featurised = {"computed": 0, "requests": 0, "error": None}
        self._featurise_wanted = threading.Event()
        self._stopping = False
        if self.worker is not None:
            self.folder.on_change = self.featurise_soon
            self.folder.on_delete = self._drop_features

    def _drop_features(self, path):
        """A capture's features go with it (kept features are named by the file's content, read before it goes)."""
        from ..data.duplicates import file_digests
        from ..training.cached_probe import store_for
        from ..training.recipes import get_recipe

        digest = file_digests([path])[0]
        if digest is not None:
            store_for(get_recipe(self.config.recipe), self.worker.store_dir).drop(digest)

    def warm_state(self):
        """What the page and tests see of the warm worker: None without one."""
        if self.worker is None:
            return None
        e = self.estimate or {}
        return {
            "worker_pid": self.worker.process.pid if self.worker.alive() else None,
            "worker_rss_mb": e.get("rss_mb") or (self.worker.ready or {}).get("rss_mb"),
            "features_computed": self.featurised["computed"],
            "images_featurised": e.get("images"),
            "up_to_date": not self._featurise_wanted.is_set() and not self.worker.busy(),
            "error": self.featurised["error"],
        }

    def begin(self):
        """Server start: start the warm worker, which featurises what the folder holds (nothing, when it is kept)."""
        if self.worker is not None:
            threading.Thread(target=self._featurise_loop, name="foldercnn-teach-features", daemon=True).start()
            self.featurise_soon()

    def featurise_soon(self):
        """After captures were added or deleted: the worker brings the features and the estimate up to date."""
        if self.worker is not None:
            self._featurise_wanted.set()

    def _featurise_loop(self):
        while not self._stopping:
            self._featurise_wanted.wait()
            self._featurise_wanted.clear()
            if self._stopping:
                return
            if not any(c["images"] for c in self.folder.classes()):
                continue  # the worker starts with the first image
            try:
                code, last = self.worker.request("featurise", data_dir=str(self.folder.root))
            except FolderCNNError as e:
                self.featurised["error"] = str(e)
                time.sleep(1)  # a worker that cannot start is not restarted in a tight loop
                continue
            if code == 0 and last and last.get("event") == "estimate":
                self.estimate = last
                self.featurised["computed"] += last["computed"]
                self.featurised["requests"] += 1
                self.featurised["error"] = None
            elif last and last.get("event") == "error":
                self.featurised["error"] = last.get("message")

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
        return [
            sys.executable,
            "-m",
            "foldercnn",
            "train",
            str(self.config.data_dir),
            "--recipe",
            self.config.recipe,
            "--out",
            str(run_dir),
            "--seed",
            str(self.config.seed),
            "--restart",
            "--events",
            "-",
            *self.config.train_args,
        ]

    def _run(self, job):
        if self.worker is not None:
            return self._run_warm(job)
        with finishing(job):
            code, stderr_tail = self._train(job)
            if code != 0:
                job.error = job.error or f"training stopped with exit code {code}: " + (
                    " | ".join(stderr_tail[-3:]) or "no output"
                )
                job.state = "failed"
                return
            job.stage, job.progress = "loading the new model", 0.97
            model_path = job.run_dir / rf.MODEL
            self.swap(model_path)
            job.result = job_result(model_path, self.folder.classes())
            job.state, job.stage, job.progress = "done", "serving the new model", 1.0

    def _run_warm(self, job):
        """A job in the warm worker: the model is swapped in as soon as its file is written (the report follows)."""
        served = []

        def on_event(event):
            follow(job, event)
            if event["event"] == "saved" and not served:
                job.stage, job.progress = "loading the new model", 0.97
                self.swap(event["model"])
                served.append(time.time())
                job.served_seconds = served[0] - job.started
                job.result = job_result(event["model"], self.folder.classes())

        with finishing(job):
            code, _ = self.worker.request(
                "train",
                on_event,
                data_dir=str(self.config.data_dir),
                out_dir=str(job.run_dir),
                options={"recipe": self.config.recipe, "seed": self.config.seed, "resume": "ignore"},
            )
            if not served:
                job.error = job.error or f"training stopped (worker exit code {code})"
                job.state = "failed"
                return
            if code != 0:  # the new model is complete and serving; only what follows it (the report) failed
                job.log.append(f"after the model was served: {job.error}")
                job.error = None
            job.state, job.stage, job.progress = "done", "serving the new model", 1.0

    def _train(self, job):
        """Run the job's `foldercnn train --events -`, following its events; (exit code, last lines of stderr)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        job.run_dir.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen(
            self.command(job.run_dir),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        self._process = process
        try:  # below the server's priority: /predict keeps its latency while a job trains
            os.setpriority(os.PRIO_PROCESS, process.pid, 10)
        except (AttributeError, OSError):
            pass
        stderr_tail = []
        drain = threading.Thread(target=keep_tail, args=(process.stderr, stderr_tail), daemon=True)
        drain.start()
        for line in process.stdout:
            event = read_event(line)
            if event is not None:
                follow(job, event)
        code = process.wait()
        drain.join(5)
        return code, stderr_tail

    def stop(self):
        """Server shutdown: end a running job's subprocess (its run folder keeps what it wrote) and the worker."""
        self._stopping = True
        self._featurise_wanted.set()
        if self.worker is not None:
            self.worker.stop()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


@contextlib.contextmanager
def finishing(job):
    """However a job ends: an exception fails it with its reason (the old model keeps serving); its seconds."""
    try:
        yield
    except Exception as e:  # the page says why
        job.error = str(e) if isinstance(e, FolderCNNError) else f"{type(e).__name__}: {e}"
        job.state = "failed"
    finally:
        job.seconds = time.time() - job.started


def warm_worker(config):
    """A WarmWorker when the recipe's features depend on each image alone and no extra train arguments are
    given; else None (jobs are `foldercnn train` subprocesses)."""
    from ..training.cached_probe import cacheable
    from ..training.options import TrainOptions
    from .teach_worker import WarmWorker, discard_prestarted

    options = TrainOptions.of(recipe=config.recipe, seed=config.seed)
    if not config.warm or config.train_args or not cacheable(options.make_recipe(), options):
        discard_prestarted()
        return None
    return WarmWorker(config.recipe, config.runs_dir)


def follow(job, event):
    """A training event (events.py) -> the job's stage, progress, log and error, as the page shows them."""
    kind = event["event"]
    if kind in ("log", "warning"):
        text = event.get("text", "")
        job.log = (job.log + [line for line in text.splitlines() if line.strip()])[-LOG_LINES:]
    elif kind == "stage":
        job.stage = event.get("what", job.stage)
    elif kind == "epoch":
        job.stage = f"training: epoch {event['epoch']}" + (f" of {event['epochs']}" if event.get("epochs") else "")
    elif kind == "error":
        job.error = event.get("message")
    progress = event.get("progress")
    if isinstance(progress, (int, float)):
        job.progress = max(job.progress, min(0.95, float(progress)))


def job_result(model_path, classes):
    """What the page shows after a job: held-out accuracy on the captures and how far to trust it."""
    from ..evaluation.calibration import wilson_interval
    from ..models.file import read_metadata

    meta = read_metadata(model_path)
    metrics = meta["metrics"]
    single = [c["name"] for c in classes if c["bursts"] < 2 and c["other_images"] == 0]
    note = None
    if single:
        note = (
            f"{', '.join(single)}: recorded in a single burst, so held-out frames have near-twins in training "
            "and the accuracy flatters; record two or more bursts per class (other moments, places, hands)"
        )
    n_val, counts = metrics["n_val"], (meta.get("data") or {}).get("counts", {})
    bursts = (meta.get("data") or {}).get("val_bursts", {})
    return {
        "model": str(model_path),
        "report": str(Path(model_path).parent / rf.REPORT),
        "val_accuracy": metrics["val_accuracy"],
        "val_ci95": list(wilson_interval(round(metrics["val_accuracy"] * n_val), n_val)),
        "n_val": n_val,
        "val_bursts": sum(bursts.values()) if bursts else None,
        "per_class": {
            c: {"train": pair[0], "held_out": pair[1], "held_out_bursts": bursts.get(c)} for c, pair in counts.items()
        },
        "n_train": metrics["n_train"],
        "classes": meta["classes"],
        "train_seconds": meta["timing"]["train_seconds"],
        "data_seconds": meta["timing"]["data_seconds"],
        "note": note,
    }
