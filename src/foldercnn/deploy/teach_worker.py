"""The warm trainer of a teaching server: one long-lived process that keeps the recipe's pretrained backbone
(for `hands`, MediaPipe Hands) loaded, computes each capture's features (the hand found in it) as it arrives
(training/cached_probe.py keeps them on disk, by file content, beside the runs), and trains on them when asked,
so pressing Train only fits the head.

The server (`WarmWorker`) talks to it by JSON lines: on its stdin one request per line, `{"id", "op", ...}` with op
"featurise" (every image of the teaching folder, then the leave-one-burst-out estimate) or "train"; on its stdout
the events of each request tagged with its id, ending with `{"event": "exit", "code": ...}`. The worker runs at
a lower CPU priority than the server; if it dies, the request in flight fails, the old model keeps serving, and the
next request starts a new worker. `python -m foldercnn.deploy.teach_worker RECIPE STORE_DIR` starts one by hand.
"""

import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import FolderCNNError

READY_TIMEOUT = 120  # seconds a new worker may take to import PyTorch and load its backbone
FEATURES_DIR = "features"  # inside the runs folder


class WorkerDied(FolderCNNError):
    pass


_PRESTARTED: dict = {}  # (recipe, store folder) -> a worker process started early (prestart)


def spawn(recipe, store_dir):
    """A new worker process, below this process's CPU priority (/predict keeps its latency while it works)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.deploy.teach_worker", recipe, str(store_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        os.setpriority(os.PRIO_PROCESS, process.pid, 10)
    except (AttributeError, OSError):
        pass
    return process


def prestart(recipe, runs_dir):
    """Start the worker of a teaching server about to start, before the server's own imports: the two start at
    the same time (a worker takes ~3 s to import PyTorch and load its backbone). The WarmWorker made later in this
    process adopts it; one that is not needed (a recipe without kept features) is stopped (discard_prestarted)."""
    store_dir = Path(runs_dir) / FEATURES_DIR
    _PRESTARTED[(recipe, str(store_dir))] = spawn(recipe, store_dir)


def discard_prestarted():
    while _PRESTARTED:
        _PRESTARTED.popitem()[1].kill()


# ---- the worker process --------------------------------------------------------------------------------------


def _rss_mb():
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def serve_requests(recipe_name, store_dir, stdin=sys.stdin, stdout=sys.stdout):
    """The worker's loop: load the backbone, answer requests until stdin closes."""
    from .. import runtime
    from ..data.folders import scan_folder
    from ..events import Events
    from ..training.cached_probe import backbone_for, burst_estimates, train_cached
    from ..training.options import TrainOptions
    from ..training.recipes import get_recipe

    # a core left to the server: two threads on two busy cores stall each other (benchmarks/README.md)
    runtime.setup(threads=max(1, runtime.physical_cores() - 1))
    lock = threading.Lock()

    def say(event):
        with lock:
            stdout.write(json.dumps(event, default=str, ensure_ascii=True) + "\n")
            stdout.flush()

    t0 = time.perf_counter()
    backbone = backbone_for(get_recipe(recipe_name), store_dir)
    backbone.warm_up()
    say({"event": "ready", "pid": os.getpid(), "seconds": round(time.perf_counter() - t0, 2), "rss_mb": _rss_mb()})
    for line in stdin:
        try:
            request = json.loads(line)
        except ValueError:
            continue
        rid = request.get("id")

        def tell(event, rid=rid):
            say({**event, "id": rid})

        code = 0
        try:
            if request.get("op") == "featurise":
                t = time.perf_counter()
                before = backbone.computed
                records = backbone.records(scan_folder(request["data_dir"], min_classes=1), log=lambda _: None)
                tell(
                    {
                        "event": "estimate",
                        "classes": burst_estimates(records),
                        "computed": backbone.computed - before,
                        "images": len(records.files),
                        "seconds": round(time.perf_counter() - t, 3),
                        "rss_mb": _rss_mb(),
                    }
                )
            elif request.get("op") == "train":
                options = TrainOptions.of(**request["options"])
                train_cached(request["data_dir"], request["out_dir"], options, backbone, Events(tell))
            else:
                raise FolderCNNError(f"unknown request {request.get('op')!r}")
        except (FolderCNNError, OSError) as e:
            tell({"event": "error", "message": str(e)})
            code = 1
        except Exception as e:  # one bad request never takes the worker (and its loaded backbone) down
            tell({"event": "error", "message": f"{type(e).__name__}: {e}"})
            code = 1
        tell({"event": "exit", "code": code, "rss_mb": _rss_mb()})


# ---- the server's side ---------------------------------------------------------------------------------------


class WarmWorker:
    """The server's handle on its worker process: started on first use (and again after it died), requests sent
    one at a time per caller, their events handed back through `request`."""

    def __init__(self, recipe, runs_dir):
        self.recipe, self.store_dir = recipe, Path(runs_dir) / FEATURES_DIR
        self.process = None
        self.ready = None  # the worker's "ready" event (pid, start seconds, resident memory)
        self._lock = threading.Lock()  # one request in flight: the worker answers them in order anyway
        self._start_lock = threading.Lock()
        self._events = queue.Queue()
        self._ids = 0
        self.stderr_tail = []

    def busy(self):
        return self._lock.locked()

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def ensure(self):
        """A running, ready worker (starting one if there is none)."""
        with self._start_lock:
            if self.alive():
                return
            self._events = queue.Queue()
            early = _PRESTARTED.pop((self.recipe, str(self.store_dir)), None)
            self.process = early if early is not None and early.poll() is None else spawn(self.recipe, self.store_dir)
            events, process = self._events, self.process
            threading.Thread(target=self._read, args=(process, events), daemon=True).start()
            threading.Thread(target=keep_tail, args=(process.stderr, self.stderr_tail), daemon=True).start()
            first = self._next(events, process, READY_TIMEOUT)
            if first.get("event") != "ready":
                raise WorkerDied(f"the training worker did not start: {first.get('message', first)}")
            self.ready = first

    def _read(self, process, events):
        for line in process.stdout:
            try:
                events.put(json.loads(line))
            except ValueError:
                continue
        events.put(None)  # end of output: the worker is gone

    def _next(self, events, process, timeout=None):
        try:
            event = events.get(timeout=timeout)
        except queue.Empty:
            process.kill()
            raise WorkerDied(f"the training worker did not answer within {timeout} s; it was stopped") from None
        if event is None:
            code = process.wait()
            tail = " | ".join(self.stderr_tail[-3:])
            raise WorkerDied(
                f"the training worker stopped (exit code {code})"
                + (f": {tail}" if tail else "")
                + "; the model served before keeps serving, and the next job starts a new worker"
            )
        return event

    def request(self, op, on_event=None, **fields):
        """Send one request and follow its events to its "exit"; returns (exit code, last event before it).
        Raises WorkerDied when the worker stops or cannot start."""
        with self._lock:
            self.ensure()
            self._ids += 1
            rid = self._ids
            process, events = self.process, self._events
            try:
                process.stdin.write(json.dumps({"id": rid, "op": op, **fields}) + "\n")
                process.stdin.flush()
            except OSError:
                self._next(events, process, 5)  # reports how it died
                raise WorkerDied("the training worker stopped") from None
            last = None
            while True:
                event = self._next(events, process)
                if event.get("id") != rid:
                    continue
                if event.get("event") == "exit":
                    return event.get("code", 1), last
                last = event
                if on_event is not None:
                    on_event(event)

    def stop(self):
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()  # what it writes is written atomically: stopping it anywhere loses nothing
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()


def keep_tail(stream, tail, lines=20):
    """The last `lines` non-empty lines of a stream, kept to explain a process that died without an error event."""
    for line in stream:
        if line.strip():
            tail.append(line.rstrip())
            del tail[:-lines]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m foldercnn.deploy.teach_worker RECIPE STORE_DIR", file=sys.stderr)
        return 2
    try:
        serve_requests(argv[0], argv[1])
    except FolderCNNError as e:
        print(json.dumps({"event": "error", "message": str(e)}), flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
