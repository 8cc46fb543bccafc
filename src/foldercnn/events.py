"""One stream of what a run does: structured events, sent to every consumer.

An event is a JSON-able dict with "event" (its kind) and fields:
  start     {options, out_dir}                     the run's options, as saved in RUN_DIR/options.json
  stage     {name, progress, what}                 a step begins; progress is the run's share done (0-1)
  epoch     {epoch, epochs, loss, accuracy, val_loss, val_accuracy, seconds, best, progress}
  model     {name, parameters, summary}            the network built (summary: its layers, as a table)
  log       {text}                                 a line for people (the console prints these)
  warning   {text}
  error     {message}                              the run stopped with this reason
  done      {model, best_epoch, val_accuracy, interrupted, progress: 1.0}
The console is one consumer (`console`), `foldercnn train --events FILE|-` another (`JsonLines`), the teach
server reads those lines: nothing downstream reads log wording.
"""

import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

Event = dict[str, Any]
Consumer = Callable[[Event], None]


class Events:
    """Sends events to its consumers. Calling it with text (`events("...")`) sends a log event, so it can be
    passed wherever a `log` function is expected. `span(lo, hi)` maps the progress of a sub-step into the run's."""

    def __init__(self, *consumers: Consumer | None, lo: float = 0.0, hi: float = 1.0) -> None:
        self.consumers = [c for c in consumers if c is not None]
        self.lo, self.hi = lo, hi

    def emit(self, kind: str, **fields: Any) -> None:
        if "progress" in fields and fields["progress"] is not None:
            fields["progress"] = round(self.lo + (self.hi - self.lo) * float(fields["progress"]), 4)
        event = {"event": kind, "time": round(time.time(), 3), **fields}
        for consume in self.consumers:
            consume(event)

    def __call__(self, text: str) -> None:
        self.emit("log", text=text)

    def warning(self, text: str) -> None:
        self.emit("warning", text=text)

    def stage(self, name: str, progress: float, what: str) -> None:
        self.emit("stage", name=name, progress=progress, what=what)

    def span(self, lo: float, hi: float) -> "Events":
        """The same consumers; a progress p of the sub-step is reported as lo + (hi - lo) * p of this one's."""
        child = Events(lo=self.lo + (self.hi - self.lo) * lo, hi=self.lo + (self.hi - self.lo) * hi)
        child.consumers = self.consumers
        return child


def quiet() -> Events:
    return Events()


def console(write: Callable[[str], None] = print) -> Consumer:
    """The console consumer: log and warning events as lines of text, epochs as one line each."""

    def consume(event: Event) -> None:
        text = console_text(event)
        if text is not None:
            write(text)

    return consume


def console_text(event: Event) -> str | None:
    """The line people read for an event (None: nothing to print)."""
    kind = event["event"]
    if kind == "log":
        return event["text"]
    if kind == "warning":
        return f"warning: {event['text']}"
    if kind == "model":
        return event["summary"]
    if kind == "epoch":
        return (
            f"epoch {event['epoch']:>3}/{event['epochs'] or '?'}  loss {event['loss']:.4f}  "
            f"accuracy {event['accuracy']:.4f}  val_loss {event['val_loss']:.4f}  "
            f"val_accuracy {event['val_accuracy']:.4f}  {event['seconds']:.1f}s" + ("  *" if event["best"] else "")
        )
    return None


class JsonLines:
    """A consumer writing each event as one JSON line (flushed at once, so a reader sees it as it happens).
    "-" writes to standard output."""

    def __init__(self, target: str) -> None:
        self.stream: TextIO = sys.stdout if target == "-" else open_events_file(target)
        self.owned = target != "-"

    def __call__(self, event: Event) -> None:
        self.stream.write(json.dumps(event, default=str, ensure_ascii=True) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.owned:
            self.stream.close()


def open_events_file(target: str) -> TextIO:
    """A file to append events to. A named pipe is opened only if a process is reading it (else the run would hang
    before its first line, waiting for one); anything else that is not a regular file is refused."""
    from .errors import FolderCNNError

    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return open(target, "a", encoding="utf-8")
    if stat.S_ISFIFO(mode) and hasattr(os, "O_NONBLOCK"):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_NONBLOCK)  # fails at once (ENXIO) when nobody reads
        except OSError:
            raise FolderCNNError(
                f"--events {target} is a pipe that no process is reading: start its reader first, or use "
                "--events - for standard output"
            ) from None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", encoding="utf-8")
    if not stat.S_ISREG(mode):
        raise FolderCNNError(f"--events {target} is not a regular file or a pipe")
    return open(target, "a", encoding="utf-8")


def read_event(line: str) -> Event | None:
    """One line of a JsonLines stream as an event, or None for a line that is not one."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None
