"""The event stream: `train --events` writes JSON lines that match the run, and the teach panel follows a job by
its events alone (every log message reworded, its progress, stages and failure reason still arrive)."""

import csv
import json
import time

import httpx
import numpy as np
import pytest

from foldercnn.events import Events, console, console_text, read_event
from testkit import draw_shape, run_cli, stop

# Imported at interpreter start (PYTHONPATH): every free-text log line a run prints or sends is reworded.
REWORD = """
import foldercnn.events as ev
_emit = ev.Events.emit
def emit(self, kind, **fields):
    if "text" in fields:
        fields["text"] = "REWORDED " + fields["text"][::-1]
    _emit(self, kind, **fields)
ev.Events.emit = emit
"""
STAGES_SHOWN = {
    "decoding the images and holding some out",
    "training",
    "calibrating",
    "fitting the unfamiliarity score",
    "writing the model file and the report",
    "loading the new model",
}


def test_train_events_are_json_lines_that_match_the_run(shapes_dirs, tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", shapes_dirs[0], "--out", out, "--epochs", "3", "--image-size", "16", "--events", "-")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]  # every line of stdout is one event
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "error" not in kinds
    assert events[0]["options"]["overrides"] == {"epochs": 3, "image_size": 16}
    assert json.loads((out / "options.json").read_text()) == events[0]["options"]
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert stages == ["data", "training", "calibration", "unfamiliarity", "report"]
    with open(out / "history.csv") as f:
        history = list(csv.DictReader(f))
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [int(h["epoch"]) for h in history] == [1, 2, 3]
    assert [round(e["val_accuracy"], 5) for e in epochs] == [round(float(h["val_accuracy"]), 5) for h in history]
    progress = [e["progress"] for e in events if "progress" in e]
    assert progress == sorted(progress) and progress[-1] == 1.0 and 0.2 < epochs[0]["progress"] < 0.7
    assert "epoch   1/3" in r.stderr and "validation:" in r.stderr  # the console's lines went to stderr


def test_a_failed_run_ends_its_events_with_the_reason(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.png").write_bytes(b"not an image")
    r = run_cli("train", tmp_path / "data", "--out", tmp_path / "run", "--events", tmp_path / "events.jsonl")
    assert r.returncode == 2
    events = [read_event(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and "no usable images" in events[-1]["message"]


def test_events_spans_and_console_wording():
    seen = []
    events = Events(seen.append)
    events.span(0.2, 0.7).span(0.5, 1.0).emit("epoch", progress=0.5)
    assert seen[-1]["progress"] == pytest.approx(0.2 + 0.5 * (0.75 * 1.0), abs=1e-4)  # 0.575
    lines = []
    Events(console(lines.append))("hello")
    assert lines == ["hello"] and console_text({"event": "stage", "name": "x"}) is None
    assert read_event("not json") is None and read_event('{"no": "kind"}') is None


@pytest.mark.slow
def test_teach_follows_jobs_by_events_when_every_message_is_reworded(tmp_path, trained_model):
    from test_teach import fast_teach_server, files, one_class_broken, png, wait_job

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(REWORD)
    data = tmp_path / "mine"
    one_class_broken(data, 6)
    server = fast_teach_server(trained_model, data, tmp_path, env={"PYTHONPATH": str(hooks)})
    try:
        url = server.url
        failed = wait_job(url, httpx.post(url + "/teach/train").json()["id"])
        assert failed["state"] == "failed" and "blocks" in failed["error"] and "Traceback" not in failed["error"]
        for i in range(6):  # now give the class real images
            draw_shape("square", 40, np.random.default_rng(i)).save(data / "blocks" / f"{i}.png")
        assert httpx.post(f"{url}/teach/classes/dots/images?burst=two", files=files(png(seed=9))).status_code == 201
        job_id, seen = httpx.post(url + "/teach/train").json()["id"], []
        while (job := httpx.get(f"{url}/teach/train/{job_id}").json())["state"] == "running":
            seen.append((job["progress"], job["stage"]))
            time.sleep(0.05)
        assert job["state"] == "done", job
        assert job["log_tail"] and all(line.startswith("REWORDED ") for line in job["log_tail"])  # it was reworded
        stages = {stage for _, stage in seen} - {"starting"}
        assert len(stages) >= 2 and stages <= STAGES_SHOWN | {f"training: epoch {n} of 12" for n in range(1, 13)}, (
            stages
        )
        progress = [p for p, _ in seen]
        assert progress == sorted(progress) and max(progress) > 0.2
    finally:
        stop(server)


def test_events_to_a_pipe_nobody_reads_is_refused_at_once(tmp_path, shapes_dirs, cli):
    """Opening a FIFO for writing blocks until a reader comes: the run would hang before its first line."""
    import os

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    r = cli("train", shapes_dirs[0], "--out", tmp_path / "run", "--events", fifo, "--epochs", "1", timeout=60)
    assert r.returncode == 2 and "no process is reading" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", shapes_dirs[0], "--out", tmp_path / "run", "--events", tmp_path, timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr


def test_events_to_a_pipe_with_a_reader_arrive(tmp_path):
    import os
    import threading

    from foldercnn.events import Events, JsonLines, read_event

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes here")
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(open(fifo, encoding="utf-8").read().splitlines()))
    reader.start()
    for _ in range(100):  # the reader opens its end first
        try:
            sink = JsonLines(str(fifo))
            break
        except Exception:
            import time

            time.sleep(0.05)
    Events(sink)("hello")
    sink.close()
    reader.join(10)
    assert read_event(lines[0])["text"] == "hello"
