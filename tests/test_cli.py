"""The real `foldercnn` command, end to end, in subprocesses."""

import csv
import json
import queue
import signal
import subprocess
import sys
import threading

import pytest
from PIL import Image

from foldercnn.models.file import read_metadata
from testkit import run_cli


@pytest.fixture(scope="module")
def cli_run(shapes_dirs, tmp_path_factory):
    """`foldercnn train` on generated shapes, once for the module."""
    out = tmp_path_factory.mktemp("cli") / "run"
    r = run_cli(
        "train",
        shapes_dirs[0],
        "--val",
        shapes_dirs[1],
        "--epochs",
        "10",
        "--image-size",
        "32",
        "--seed",
        "1",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow
def test_train_writes_run_directory(cli_run):
    out, r = cli_run
    for name in ("model.safetensors", "history.csv", "curves.png", "augmentations.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader(open(out / "history.csv")))
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]
    assert len(rows) == 10
    assert "Total params" in r.stdout and "epoch  10/10" in r.stdout
    assert Image.open(out / "curves.png").size[0] > 400
    assert read_metadata(out / "model.safetensors")["metrics"]["n_val"] == 45


@pytest.mark.slow
def test_evaluate_beats_chance_and_json_shape(cli_run, shapes_dirs, cli):
    out, _ = cli_run
    r = cli("evaluate", out / "model.safetensors", shapes_dirs[1], "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 45 and result["n_skipped"] == 0
    assert result["accuracy"] > 0.6  # chance is 1/3
    assert set(result["per_class"]) == {"circle", "square", "triangle"}
    assert sum(map(sum, result["confusion"])) == 45
    text = cli("evaluate", out / "model.safetensors", shapes_dirs[1]).stdout
    assert "confusion matrix" in text and "precision" in text


@pytest.mark.slow
def test_predict_json_and_text(cli_run, shapes_dirs, cli, tmp_path):
    out, _ = cli_run
    folder = tmp_path / "new"
    (folder / "deeper").mkdir(parents=True)
    for i, p in enumerate(sorted((shapes_dirs[1] / "circle").glob("*.png"))[:3]):
        (folder / ("deeper" if i else "") / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_text("nope")
    r = cli("predict", out / "model.safetensors", folder, "--json", "--top-k", "2")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and "broken.png" in r.stderr
    for row in rows:
        assert {"path", "label", "probability", "probabilities", "uncertain", "unfamiliar", "unfamiliarity"} <= set(row)
        assert row["unfamiliar"] == (row["unfamiliarity"] > 1)
        assert set(row["probabilities"]) == {"circle", "square", "triangle"}
        assert row["probability"] == max(row["probabilities"].values())
        assert len(row["top_k"]) == 2
    one = next(p for p in folder.glob("*.png") if p.name != "broken.png")
    text = cli("predict", out / "model.safetensors", one).stdout
    assert "%" in text


def test_inspect(shapes_dirs, cli, tmp_path):
    r = cli("inspect", shapes_dirs[0], "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 classes, 120 usable images" in r.stdout and "40x40" in r.stdout
    assert (tmp_path / "samples.png").is_file()


@pytest.mark.slow
def test_seed_makes_training_repeatable(shapes_dirs, tmp_path, cli):
    runs = []
    for name in ("a", "b"):
        r = cli("train", shapes_dirs[0], "--epochs", "2", "--image-size", "24", "--seed", "7", "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
        runs.append((tmp_path / name / "history.csv").read_text().splitlines())
    strip = lambda lines: [line.rsplit(",", 1)[0] for line in lines]  # drop the seconds column
    assert strip(runs[0]) == strip(runs[1])
    import foldercnn

    a, b = (foldercnn.load(tmp_path / n / "model.safetensors") for n in "ab")
    assert all(torch_equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def torch_equal(x, y):
    import torch

    return torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "{missing}", "--out", "{tmp}/r"], "folder not found"),
        (["evaluate", "{tmp}/nope.safetensors", "{tmp}"], "model file not found"),
        (["predict", "{model}", "{tmp}/nope.png"], "not found"),
        (["train", "{data}", "--out", "{tmp}/r", "--epochs", "0"], "argument --epochs: 0 is not between 1 and"),
        (
            ["train", "{data}", "--out", "{tmp}/r", "--val-fraction", "1.5"],
            "argument --val-fraction: 1.5 is not a number",
        ),
        (["train", "{data}", "--out", "{tmp}/r", "--fine-tune"], "follows a linear probe"),
        (
            ["train", "{data}", "--out", "{tmp}/r", "--image-size", "32", "--start-size", "40"],
            "--start-size must not exceed image_size (32), got 40",
        ),
    ],
)
def test_errors_are_clear_without_traceback(args, message, cli, tmp_path, shapes_dirs, trained_model):
    fill = {"missing": tmp_path / "missing", "tmp": tmp_path, "data": shapes_dirs[0], "model": trained_model.model_path}
    r = cli(*[a.format(**fill) for a in args])
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_keeps_best_model(shapes_dirs, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "foldercnn.cli",
            "train",
            str(shapes_dirs[0]),
            "--epochs",
            "500",
            "--image-size",
            "24",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"},
    )
    lines = queue.Queue()  # read in a thread, so a silent hang fails the test instead of blocking it
    threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True).start()
    try:
        while not lines.get(timeout=300).startswith("epoch   2/"):
            pass
    except queue.Empty:
        proc.kill()
        pytest.fail("no second epoch within 300 s")
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    rest = "".join(lines.queue)
    assert proc.returncode == 130, rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert (out / "model.safetensors").is_file()
    assert read_metadata(out / "model.safetensors")["metrics"]["interrupted"] is True
