"""A file name is bytes on POSIX and need not be UTF-8 (disks written by other systems): every command hashes and
prints such a name without failing, also on a strict UTF-8 terminal."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="Windows file names are UTF-16")


@pytest.fixture
def latin1_folder(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("paper", "rock"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            name = f"caf\xe9{i}.png".encode("latin-1") if i % 2 else f"{i}.png".encode()
            image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
            image.save(os.fsdecode(os.fsencode(tmp_path / "data" / cls) + b"/" + name))
    return tmp_path / "data"


@pytest.mark.slow
def test_commands_take_a_folder_whose_names_are_not_utf8(latin1_folder, tmp_path, cli):
    strict = {"PYTHONIOENCODING": "utf-8:strict", "FOLDERCNN_CACHE": str(tmp_path / "cache")}
    run = tmp_path / "run"
    commands = [
        ("train", latin1_folder, "--out", run, "--epochs", "1", "--image-size", "32", "--start-size", "0"),
        ("inspect", latin1_folder, "--out", tmp_path / "inspect"),
        ("evaluate", run / "model.safetensors", latin1_folder),
        ("predict", run / "model.safetensors", latin1_folder / "rock"),
    ]
    for args in commands:
        r = cli(*args, env=strict)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args[0], r.stderr[-2000:])
    printed = cli("predict", run / "model.safetensors", latin1_folder / "rock", env=strict).stdout
    assert "caf\\udce91.png" in printed  # the odd byte shown as an escape, the name otherwise as it is
    rows = json.loads(cli("predict", run / "model.safetensors", latin1_folder / "rock", "--json", env=strict).stdout)
    assert len(rows) == 8 and any(os.fsencode(r["path"]).endswith(b"caf\xe91.png") for r in rows)


def test_explain_shortens_the_picture_of_an_image_with_a_long_name(trained_model, shapes_dirs, tmp_path, cli):
    """A 244-byte name is legal; numbered and written through a temporary file, the picture's name was not."""
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    source = next(shapes_dirs[1].rglob("*.png"))
    long_name = photos / ("x" * 240 + ".png")
    shutil.copy(source, long_name)
    shutil.copy(source, photos / "short.png")
    r = cli("predict", trained_model.model_path, photos, "--explain", tmp_path / "maps")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert len(r.stdout.strip().splitlines()) == 2  # both predictions printed
    pictures = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert len(pictures) == 2 and all(len(name.encode()) <= 120 for name in pictures)


def test_a_class_folder_that_links_to_another_class_is_refused(tmp_path, cli):
    from testkit import noise_folder

    noise_folder(tmp_path / "data", ("paper", "rock"), seed=1)
    (tmp_path / "data" / "paper_link").symlink_to(tmp_path / "data" / "paper", target_is_directory=True)
    for args in (
        ("inspect", tmp_path / "data", "--out", tmp_path / "i"),
        ("train", tmp_path / "data", "--out", tmp_path / "r"),
    ):
        r = cli(*args, env={"FOLDERCNN_CACHE": str(tmp_path / "cache")})
        assert r.returncode == 2 and "are the same folder" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "paper" in r.stderr and "paper_link" in r.stderr
