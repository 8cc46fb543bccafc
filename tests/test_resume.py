"""Checkpoints and resume: a run killed with SIGKILL at a random moment continues from its last finished
epoch and ends with the same weights and history, bit for bit, as a run never interrupted (fp32, CPU)."""

import csv
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from testkit import run_cli

pytestmark = pytest.mark.slow  # real subprocesses end to end: not in the quick loop

EPOCHS = 6


def train_args(data, out, *extra):
    return [
        "train",
        str(data),
        "--out",
        str(out),
        "--epochs",
        str(EPOCHS),
        "--image-size",
        "24",
        "--precision",
        "fp32",
        "--seed",
        "3",
        *extra,
    ]


def history(run):
    with open(run / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def finished_epochs(run):
    try:
        return len(history(run))
    except (OSError, ValueError):
        return 0


def kill_during_epoch(data, out, epoch, delay):
    """Start training and SIGKILL it `delay` seconds into epoch `epoch` (after epoch-1 finished)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.cli", *train_args(data, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while finished_epochs(out) < epoch - 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return proc.returncode


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(shapes_dirs, tmp_path):
    data = shapes_dirs[0]
    clean = run_cli(*train_args(data, tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr
    run = tmp_path / "killed"
    rng = random.Random(7)
    for epoch in (2, 4):  # two crashes at random moments of two epochs
        code = kill_during_epoch(data, run, epoch, rng.uniform(0.0, 0.6))
        assert code in (-signal.SIGKILL, 0)
        assert (run / "checkpoint.safetensors").is_file() or code == 0
    resumed = run_cli(*train_args(data, run))
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the interrupted run" in resumed.stdout
    assert history(run) == history(tmp_path / "clean")
    a, b = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "clean" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (run / "checkpoint.safetensors").exists()  # a finished run leaves no checkpoint behind


@pytest.fixture(scope="module")
def interrupted(shapes_dirs, tmp_path_factory):
    """A run folder holding a checkpoint (a run killed during its third epoch)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    while not (out / "checkpoint.safetensors").is_file():  # a kill can land before the first checkpoint
        kill_during_epoch(shapes_dirs[0], out, 3, 0.1)
    return out


def test_a_checkpoint_holds_no_pickle_and_the_whole_state(interrupted):
    with safe_open(str(interrupted / "checkpoint.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["foldercnn_checkpoint"])
        keys = set(f.keys())
    assert {"rng.generator", "rng.torch", "batches.perm"} <= keys
    assert any(k.startswith("optim.") for k in keys) and any(k.startswith("model.") for k in keys)
    assert meta["epoch"] >= 1 and len(meta["history"]) == meta["epoch"] and meta["identity"]["seed"] == 3
    assert {"python", "numpy"} <= set(meta["rng"])
    data = (interrupted / "checkpoint.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__")
    assert 8 + n + max(e["data_offsets"][1] for e in header.values()) == len(data)  # nothing but tensors


def test_a_changed_recipe_or_folder_is_refused_unless_forced(interrupted, shapes_dirs, tmp_path):
    r = run_cli(*train_args(shapes_dirs[0], interrupted, "--lr", "0.01"))
    assert r.returncode == 2 and "belongs to a different run (changed: recipe)" in r.stderr
    r = run_cli(*train_args(shapes_dirs[1], interrupted))
    assert r.returncode == 2 and "changed: data" in r.stderr
    r = run_cli("train", shapes_dirs[0], "--out", tmp_path / "fresh", "--resume")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_an_image_edited_in_place_between_a_kill_and_the_resume_is_named(shapes_dirs, tmp_path):
    import shutil

    from PIL import Image

    data = tmp_path / "data"
    shutil.copytree(shapes_dirs[0], data)
    run = tmp_path / "run"
    while not (run / "checkpoint.safetensors").is_file():
        kill_during_epoch(data, run, 3, 0.1)
    edited = sorted((data / "circle").glob("*.png"))[4]
    image = Image.open(edited).convert("RGB")
    image.putpixel((0, 0), (255, 0, 255))  # same name, same folder, other pixels
    image.save(edited)
    r = run_cli(*train_args(data, run))
    assert r.returncode == 2 and "changed: data: 1 modified" in r.stderr and edited.name in r.stderr, r.stderr
    assert (run / "checkpoint.safetensors").is_file()  # refused: the interrupted run is still there to continue


def test_restart_ignores_a_checkpoint_and_old_run_folders_still_work(interrupted, trained_model, shapes_dirs, tmp_path):
    import shutil

    import foldercnn

    copy = tmp_path / "copy"
    shutil.copytree(interrupted, copy)
    r = run_cli(*train_args(shapes_dirs[0], copy, "--restart", "--epochs", "1"))
    assert r.returncode == 0 and "continuing" not in r.stdout and len(history(copy)) == 1
    assert not (trained_model.out_dir / "checkpoint.safetensors").exists()
    assert foldercnn.load(trained_model.model_path).predict(next(shapes_dirs[1].rglob("*.png"))).label
    r = run_cli("report", trained_model.out_dir)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_a_run_killed_during_its_refit_resumes_the_split_and_refits_to_the_same_model(shapes_dirs, tmp_path):
    """--refit: the split's finished checkpoint is kept until the refitted model is written, so a kill during the
    refit costs only the refit; the resumed run saves the model an uninterrupted one saves, bit for bit."""
    data = shapes_dirs[0]
    clean = run_cli(*train_args(data, tmp_path / "clean", "--refit"))
    assert clean.returncode == 0, clean.stderr
    run, events = tmp_path / "killed", tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.cli", *train_args(data, run, "--refit", "--events", str(events))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if events.is_file() and '"name": "refit"' in events.read_text():
            break
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed during its refit"
    assert (run / "checkpoint.safetensors").is_file() and not (run / "model.safetensors").exists()
    resumed = run_cli(*train_args(data, run, "--refit"))
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing the interrupted run" in resumed.stdout and "refit: a fresh model" in resumed.stdout
    a, b = load_file(str(run / "model.safetensors")), load_file(str(tmp_path / "clean" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not (run / "checkpoint.safetensors").exists()
