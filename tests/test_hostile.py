"""Careless and hostile inputs to the commands: each answered with one clear error (exit 2) or a reported skip,
never a traceback, a hang or a file where it does not belong."""
import os

import pytest

import foldercnn
from foldercnn import FolderCNNError


@pytest.fixture
def fifo_folder(shapes_dirs, tmp_path):
    """A copy (links) of the shapes test folder with a named pipe among the images: opening it blocks for ever."""
    root = tmp_path / "with-pipe"
    for cls in sorted(p for p in shapes_dirs[1].iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:5]:
            (root / cls.name / f.name).symlink_to(f)
    os.mkfifo(root / "circle" / "pipe.png")
    return root


@pytest.mark.parametrize("command", ["predict", "evaluate", "inspect"])
def test_a_named_pipe_is_skipped_not_waited_for(fifo_folder, trained_model, cli, tmp_path, command):
    args = {"predict": ["predict", trained_model.model_path, fifo_folder],
            "evaluate": ["evaluate", trained_model.model_path, fifo_folder],
            "inspect": ["inspect", fifo_folder]}[command]
    r = cli(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pipe.png" in r.stdout + r.stderr and "named pipe" in r.stdout + r.stderr


def test_a_named_pipe_given_directly_is_skipped(fifo_folder, trained_model, cli):
    r = cli("predict", trained_model.model_path, fifo_folder / "circle" / "pipe.png", timeout=60)
    assert r.returncode == 2 and "not a regular file (a named pipe)" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["serve", "MODEL", "--port", "-1"], "argument --port: -1 is not between 0 and 65,535"),
    (["serve", "MODEL", "--port", "99999"], "argument --port: 99999 is not between"),
    (["serve", "MODEL", "--max-upload-mb", "nan"], "argument --max-upload-mb: nan is not a number >= 0.001"),
    (["serve", "MODEL", "--max-upload-mb", "inf"], "argument --max-upload-mb"),
    (["serve", "MODEL", "--max-upload-mb", "1e-9"], "argument --max-upload-mb"),
    (["train", "DATA", "--out", "OUT", "--lr", "1e308"], "argument --lr: 1e308 is not a number > 0"),
    (["train", "DATA", "--out", "OUT", "--seed", "1180591620717411303424"], "argument --seed"),
    (["train", "DATA", "--out", "OUT", "--seed", "9" * 5000], "argument --seed"),
    (["train", "DATA", "--out", "OUT", "--time-budget", "inf", "--epochs", "1"], "argument --time-budget"),
    (["train", "DATA", "--out", "OUT", "--val-fraction", "1"], "argument --val-fraction"),
    (["predict", "MODEL", "x.png", "--top-k", "0"], "argument --top-k"),
    (["train", "DATA", "--out", "OUT", "--epochs", "0"], "argument --epochs: 0 is not between 1 and"),
    (["train", "DATA", "--out", "OUT", "--uncertain-below", "1.5"], "argument --uncertain-below"),
])
def test_numeric_options_are_range_checked_by_the_parser(args, message, cli, trained_model, shapes_dirs, tmp_path):
    real = {"MODEL": trained_model.model_path, "DATA": shapes_dirs[0], "OUT": tmp_path / "out"}
    r = cli(*[real.get(a, a) for a in args], timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_diverging_training_stops_and_saves_nothing(shapes_dirs, tmp_path):
    with pytest.raises(FolderCNNError, match="training diverged.*nothing was saved"):
        foldercnn.train(shapes_dirs[0], tmp_path / "run", recipe="fast", epochs=2, image_size=16, lr=1e30,
                        log=lambda *a: None)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_export_makes_no_folders_and_writes_nothing_into_the_data(trained_model, shapes_dirs, cli, tmp_path):
    r = cli("export", trained_model.model_path, "--out", tmp_path / "nonexistent" / "dir" / "x.onnx")
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "nonexistent").exists()
    r = cli("export", trained_model.model_path, "--out", shapes_dirs[0] / "circle" / "x.onnx")
    assert r.returncode == 2 and "inside the data folder" in r.stderr
    assert not (shapes_dirs[0] / "circle" / "x.onnx").exists()


def test_inspect_out_that_is_a_file_says_so(shapes_dirs, cli, tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    r = cli("inspect", shapes_dirs[0], "--out", existing)
    assert r.returncode == 2 and "exists and is not a folder" in r.stderr and existing.read_text() == "mine"
