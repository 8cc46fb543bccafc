"""Careless and hostile inputs to the commands: each answered with one clear error (exit 2) or a reported skip,
never a traceback, a hang or a file where it does not belong."""

import os

import pytest

import foldercnn
from foldercnn import FolderCNNError

pytestmark = pytest.mark.slow  # real commands in subprocesses


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
    args = {
        "predict": ["predict", trained_model.model_path, fifo_folder],
        "evaluate": ["evaluate", trained_model.model_path, fifo_folder],
        "inspect": ["inspect", fifo_folder],
    }[command]
    r = cli(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pipe.png" in r.stdout + r.stderr and "named pipe" in r.stdout + r.stderr


def test_a_named_pipe_given_directly_is_skipped(fifo_folder, trained_model, cli):
    r = cli("predict", trained_model.model_path, fifo_folder / "circle" / "pipe.png", timeout=60)
    assert r.returncode == 2 and "not a regular file (a named pipe)" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
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
    ],
)
def test_numeric_options_are_range_checked_by_the_parser(args, message, cli, trained_model, shapes_dirs, tmp_path):
    real = {"MODEL": trained_model.model_path, "DATA": shapes_dirs[0], "OUT": tmp_path / "out"}
    r = cli(*[real.get(a, a) for a in args], timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_diverging_training_stops_and_saves_nothing(shapes_dirs, tmp_path):
    with pytest.raises(FolderCNNError, match="training diverged.*nothing was saved"):
        foldercnn.train(
            shapes_dirs[0], tmp_path / "run", recipe="fast", epochs=2, image_size=16, lr=1e30, log=lambda *a: None
        )
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


# ---- model files and evaluation.json with values JSON cannot carry, or of the wrong type ----------------


def _tamper(src, dst, change):
    from test_model_file import _with_meta

    dst.write_bytes(_with_meta(src.read_bytes(), change))
    return dst


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["metrics"].update(val_accuracy=float("nan")), "metadata.metrics.val_accuracy is nan"),
        (lambda m: m["metrics"].update(val_accuracy=float("inf")), "is inf, not a finite number"),
        (lambda m: m.update(metrics="val_accuracy"), "metrics is not an object"),
        (lambda m: m["metrics"].update(val_accuracy=None), "metrics val_accuracy None"),
        (lambda m: m["metrics"].update(n_val="lots"), "metrics n_val 'lots'"),
        (lambda m: m.update(seed=10**30), "seed"),
    ],
)
def test_metadata_that_would_break_a_page_is_refused(trained_model, tmp_path, cli, change, message):
    bad = _tamper(trained_model.model_path, tmp_path / "m.safetensors", change)
    for args in (["predict", bad, trained_model.model_path], ["report", tmp_path, "--model", bad]):
        r = cli(*args)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def _header_bytes(header_json):
    raw = header_json.encode()
    return len(raw).to_bytes(8, "little") + raw


@pytest.mark.parametrize("header", ["[" * 10_000 + "]" * 10_000, '{"a": ' + "9" * 5000 + "}"])
def test_a_header_nested_too_deep_or_with_a_huge_number_is_refused(tmp_path, cli, header):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_header_bytes(header))
    for args in (["predict", path, path], ["evaluate", path, tmp_path], ["export", path]):
        r = cli(*args)
        assert r.returncode == 2 and "not a safetensors model file" in r.stderr and "Traceback" not in r.stderr


def test_metadata_nested_too_deep_is_refused(trained_model, tmp_path, cli):
    from test_model_file import _join, _split

    header, body = _split(trained_model.model_path.read_bytes())
    header["__metadata__"]["foldercnn"] = "[" * 10_000 + "]" * 10_000
    path = tmp_path / "m.safetensors"
    path.write_bytes(_join(header, body))
    r = cli("predict", path, path)
    assert r.returncode == 2 and "too deeply nested" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "change",
    [
        lambda e: e.update(accuracy=float("nan")),
        lambda e: e.update(n="lots"),
        lambda e: e.pop("accuracy_ci95"),
        lambda e: e.update(per_class=[1, 2]),
    ],
)
def test_a_damaged_evaluation_json_is_left_out_of_the_report_and_the_server(
    trained_model, shapes_dirs, tmp_path, cli, change
):
    import json
    import shutil

    from fastapi.testclient import TestClient

    from foldercnn.deploy.serve import create_app

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_model.model_path, run / "model.safetensors")
    assert cli("evaluate", run / "model.safetensors", shapes_dirs[1], "--out", run).returncode == 0
    ev = json.loads((run / "evaluation.json").read_text())
    change(ev)
    (run / "evaluation.json").write_text(json.dumps(ev))
    r = cli("report", run)
    assert r.returncode == 0, r.stderr
    assert "not a usable evaluation" in (run / "report.html").read_text()
    with TestClient(create_app(run / "model.safetensors")) as client:
        got = client.get("/model")
        assert got.status_code == 200 and got.json()["headline"]["source"] == "validation"


# ---- availability and memory ----------------------------------------------------------------------------


def _slow_client(port, results, every=1.0, limit=30.0):
    """Headers and 100 bytes of a 200 KB upload, then a byte every `every` s until an answer comes."""
    import socket
    import time

    body = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.png"\r\n\r\n' + b"\0" * 200_000
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(
            (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                f"Content-Length: {len(body) + 100}\r\n\r\n"
            ).encode()
            + body[:100]
        )
        s.settimeout(every)
        for i in range(int(limit / every)):
            try:
                answer = s.recv(100)
                results.append((answer.split(b"\r\n")[0], time.perf_counter() - t))
                return
            except socket.timeout:
                s.sendall(body[100 + i : 101 + i])
    results.append((b"no answer", time.perf_counter() - t))


def test_slow_uploads_are_cut_off_and_do_not_starve_other_clients(trained_model, shapes_dirs, tmp_path):
    """One worker: 2 upload slots, filled twice over by 4 clients that send a byte a second."""
    import threading
    import time

    import httpx

    from testkit import running_server

    image = sorted(shapes_dirs[1].rglob("*.png"))[0].read_bytes()
    with running_server(trained_model.model_path, "--workers", "1", log=tmp_path / "server.log") as server:
        slow = []
        threads = [threading.Thread(target=_slow_client, args=(server.port, slow)) for _ in range(4)]
        for th in threads:
            th.start()
        time.sleep(0.5)
        t = time.perf_counter()
        r = httpx.post(server.url + "/predict", files=[("files", ("a.png", image, "image/png"))], timeout=30)
        waited = time.perf_counter() - t
        for th in threads:
            th.join()
    assert r.status_code == 200 and waited < 10, waited
    assert [status for status, _ in slow] == [b"HTTP/1.1 408 Request Timeout"] * 4, slow
    assert max(seconds for _, seconds in slow) < 15, slow


def test_a_huge_16_bit_png_decodes_within_bounded_memory(tmp_path):
    """8944 x 8944 16-bit grey (an 80 M-pixel PNG of 155 KB): a float64 copy of it took 2 GB more."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    path = tmp_path / "big.png"
    Image.fromarray(np.full((8944, 8944), 40000, np.uint16)).save(path)
    probe = (
        "import sys\nfrom foldercnn.data.images import decode\n"
        "def hwm():\n    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "before = hwm(); a = decode(sys.argv[1], 64); print(hwm() - before, int(a[0, 0, 0]))"
    )
    r = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    grew_kb, pixel = map(int, r.stdout.split())
    assert pixel == round(40000 / 257)  # the same value as before: 16 bits scaled to 8
    assert grew_kb < 600 * 1024, grew_kb  # measured ~470 MB (the decoded 16-bit image alone is 160 MB)


def test_inference_batches_follow_a_memory_budget_whatever_the_image_size():
    from foldercnn.models.registry import INFERENCE_BUDGET_BYTES, get_spec, inference_batch

    assert inference_batch("fast-cnn", 64) == 64
    assert inference_batch("fast-cnn", 1024) == 1
    for name in ("fast-cnn", "tutorial-cnn", "effnet-lite0"):
        size = 512
        batch = inference_batch(name, size)
        assert batch == 1 or batch * size**2 * get_spec(name).activation_bytes_per_pixel <= INFERENCE_BUDGET_BYTES
