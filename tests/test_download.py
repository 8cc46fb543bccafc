"""Downloading the tutorial's zips, against a real HTTP server on 127.0.0.1."""

import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import foldercnn
from foldercnn.data.download import DownloadError, OfflineError, download, safe_extract
from foldercnn.demo import download_rps, run_demo
from testkit import make_shapes


def png_bytes(colour):
    buf = io.BytesIO()
    Image.new("RGB", (30, 30), colour).save(buf, "PNG")
    return buf.getvalue()


def make_zip(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def rps_zip(top, per_class=4):
    colours = {"paper": (250, 200, 200), "rock": (90, 60, 40), "scissors": (40, 160, 40)}
    return make_zip(
        {
            f"{top}/{c}/{c}{i}.png": png_bytes(tuple(min(255, v + 3 * i) for v in col))
            for c, col in colours.items()
            for i in range(per_class)
        }
    )


class Server:
    """Serves a dict of path -> bytes; `lie` makes it announce a different Content-Length."""

    def __init__(self):
        self.files, self.lie = {}, {}
        files, lie = self.files, self.lie

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(lie.get(self.path, len(body))))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    s = Server()
    yield s
    s.close()


def test_good_download_and_extract(server, tmp_path):
    server.files["/rps.zip"] = rps_zip("rps")
    server.files["/rps-test-set.zip"] = rps_zip("rps-test-set", 2)
    root = download_rps(tmp_path / "rps", base_url=server.url, progress=False)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["paper", "rock", "scissors"]
    assert len(list((root / "test" / "rock").iterdir())) == 2
    assert not list(root.glob("*.zip")) and not list(root.glob(".*"))  # no leftovers


def test_size_mismatch_is_refused(server, tmp_path):
    server.files["/f.zip"] = b"x" * 100
    server.lie["/f.zip"] = 200  # announces more bytes than it sends: an incomplete download
    with pytest.raises(DownloadError, match="incomplete|broke off"):
        download(server.url + "/f.zip", tmp_path / "f.zip", progress=False)
    assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_truncated_zip_is_refused(server, tmp_path):
    data = rps_zip("rps")
    server.files["/rps.zip"] = data[: len(data) // 2]
    server.files["/rps-test-set.zip"] = rps_zip("rps-test-set")
    with pytest.raises(DownloadError, match="not a valid zip|corrupt"):
        download_rps(tmp_path / "rps", base_url=server.url, progress=False)
    assert not (tmp_path / "rps" / "train").exists()


@pytest.mark.parametrize("evil", ["../escape.png", "/abs/escape.png", "rps/../../escape.png"])
def test_zip_entry_escaping_target_is_refused(tmp_path, evil):
    z = tmp_path / "evil.zip"
    z.write_bytes(make_zip({"rps/rock/ok.png": png_bytes((1, 2, 3)), evil: b"pwned"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="unsafe path"):
        safe_extract(z, tmp_path / "out" / "target")
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "out" / "escape.png").exists()
    assert not (tmp_path / "out" / "target").exists()


def test_http_error_and_offline(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url + "/missing.zip", tmp_path / "m.zip", progress=False)
    with pytest.raises(OfflineError):
        download("http://127.0.0.1:9/nothing-listens-here.zip", tmp_path / "m.zip", progress=False, timeout=5)


@pytest.mark.slow
def test_demo_downloads_into_cache_and_runs(server, tmp_path, monkeypatch):
    server.files["/rps.zip"] = rps_zip("rps", per_class=10)
    server.files["/rps-test-set.zip"] = rps_zip("rps-test-set", 3)
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FOLDERCNN_RPS_URL", server.url)
    monkeypatch.delenv("FOLDERCNN_RPS_DIR", raising=False)
    photos = tmp_path / "photos"  # two "real photo" sets, as in rps-photos/
    for name, seed in (("cam-a", 1), ("cam-b", 2)):
        make_shapes(photos / name, per_class=4, size=30, seed=seed, classes=("paper", "rock", "scissors"))
    lines = []
    # the demo's recipe without MediaPipe Hands, robust, shortened (shapes have no hands for the default, hands)
    result = run_demo(
        out=tmp_path / "demo",
        recipe="robust",
        image_size=64,
        probe_views=1,
        log=lines.append,
        progress=False,
        photos=photos,
    )
    text = "\n".join(map(str, lines))
    assert "(download)" in text and "evaluate on the test set" in text
    assert "real photos of hands" in text and "on 24 real photos" in text
    rows = json.loads((tmp_path / "demo" / "other_folders.json").read_text())
    assert [Path(r["data_dir"]).name for r in rows] == ["cam-a", "cam-b"] and rows[0]["n"] == 12
    assert "How it does on other photos" in (tmp_path / "demo" / "report.html").read_text()
    assert (tmp_path / "cache" / "rps" / "train" / "rock").is_dir()
    for name in ("samples.png", "augmentations.png", "curves.png", "model.safetensors", "evaluation.json"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert result.classes == ["paper", "rock", "scissors"]
    # the test folder is only evaluated: validation and the temperature come from a split of train/
    meta = foldercnn.load(result.model_path).metadata
    assert meta["recipe"]["name"] == "robust" and meta["architecture"] == "effnet-lite2"
    assert "held out of the training folder" in meta["data"]["validation"]
    assert meta["calibration"]["fitted_on"] == f"validation split ({result.n_val} images)"
    assert result.n_train + result.n_val == 30


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["seed"])
def test_demo_with_the_tutorial_recipe_never_validates_on_test(server, tmp_path, monkeypatch, recipe):
    server.files["/rps.zip"] = rps_zip("rps", per_class=10)
    server.files["/rps-test-set.zip"] = rps_zip("rps-test-set", 3)
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FOLDERCNN_RPS_URL", server.url)
    monkeypatch.delenv("FOLDERCNN_RPS_DIR", raising=False)
    monkeypatch.delenv("FOLDERCNN_RPS_PHOTOS_DIR", raising=False)
    result = run_demo(
        out=tmp_path / "demo", recipe=recipe, epochs=1, image_size=48, batch_size=8, log=lambda *a: None, progress=False
    )
    meta = foldercnn.load(result.model_path).metadata
    assert "held out of the training folder" in meta["data"]["validation"] and result.n_val == 6
    assert meta["calibration"]["fitted_on"] == "validation split (6 images)"


@pytest.mark.slow
def test_demo_offline_falls_back_to_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FOLDERCNN_RPS_URL", "http://127.0.0.1:9/")
    monkeypatch.delenv("FOLDERCNN_RPS_DIR", raising=False)
    lines = []
    result = run_demo(out=tmp_path / "demo", epochs=3, image_size=16, log=lines.append, progress=False)
    text = "\n".join(map(str, lines))
    assert "offline" in text and "handwritten digits" in text
    assert result.classes == [str(d) for d in range(10)]
    assert result.recipe.name == "fast"  # robust's any-angle rotations would confuse 6 and 9
    assert json.loads((tmp_path / "demo" / "evaluation.json").read_text())["accuracy"] > 0.8  # chance is 0.1


@pytest.mark.slow
def test_the_demo_trains_hands_by_default_and_says_when_a_folder_has_no_hands(server, tmp_path, monkeypatch):
    from foldercnn import FolderCNNError
    from foldercnn.data import hands

    if not hands.available():
        pytest.skip("onnxruntime is not installed: the demo trains robust (the test above)")
    server.files["/rps.zip"] = rps_zip("rps", per_class=10)
    server.files["/rps-test-set.zip"] = rps_zip("rps-test-set", 3)
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FOLDERCNN_RPS_URL", server.url)
    monkeypatch.delenv("FOLDERCNN_RPS_DIR", raising=False)
    lines = []
    with pytest.raises(FolderCNNError, match="too few hands to train on"):
        run_demo(out=tmp_path / "demo", log=lines.append, progress=False, photos=tmp_path / "none")
    assert any("recipe 'hands'" in str(line) for line in lines)
