"""`foldercnn serve`: the API in-process (FastAPI's TestClient) and as a real server subprocess on 127.0.0.1."""

import asyncio
import io
import json
import os
import re
import signal
import socket
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import foldercnn
from foldercnn.data.images import MAX_PIXELS
from foldercnn.deploy.serve import create_app
from testkit import draw_shape, free_port, run_cli, running_server, start_server, stop, wait_healthy

MB = 1024 * 1024


# --- images made here -----------------------------------------------------------------------------------


def encode(im, fmt, **kw):
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def shape_png(kind="circle", size=48, seed=0):
    return encode(draw_shape(kind, size, np.random.default_rng(seed)), "PNG")


def png_claiming_size(width, height):
    """A tiny PNG whose header declares width x height: what a decompression bomb looks like up front."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def noise_png(side, seed=0):
    """A PNG that barely compresses: side*side*3 bytes or a little more."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return encode(Image.fromarray(pixels), "PNG", compress_level=0)


def files(*named):
    """[(filename, bytes)] -> the `files=` argument of an HTTP client, all in the field 'files'."""
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


# --- in-process ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(trained_model):
    return trained_model.model_path


@pytest.fixture(scope="module")
def classifier(model_path):
    return foldercnn.load(model_path)


@pytest.fixture(scope="module")
def client(classifier):
    with TestClient(create_app(classifier, max_upload_mb=0.5, max_files=8, workers=2)) as c:
        yield c


def test_page_is_one_self_contained_file(client, classifier):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"""(src|href|action)\s*=\s*["']?\s*(https?:)?//""", html), "no external assets"
    assert not re.search(r"""@import|url\(\s*["']?(https?:)?//""", html)
    assert "default-src 'none'" in r.headers["content-security-policy"]  # the browser enforces it too
    assert 'id="file-input"' in html and 'for="file-input"' in html and "multiple" in html
    assert "Use camera" in html and "getUserMedia" in html
    assert "__MAX_" not in html and "up to 0.5 MB each" in html


def test_model_health_and_docs(client, classifier):
    meta = client.get("/model").json()
    assert meta["classes"] == classifier.classes and meta["image_size"] == classifier.image_size
    assert "val_accuracy" in meta["metrics"]
    assert client.get("/healthz").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["items"]["format"] == "binary"
    assert {"400", "413", "415", "503"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert client.get("/docs").status_code == 200


def test_predict_gives_the_python_apis_answer_for_each_file_in_order(client, classifier, shapes_dirs):
    paths = [sorted((shapes_dirs[1] / kind).glob("*.png"))[0] for kind in ("triangle", "circle", "square")]
    r = client.post("/predict", files=files(*[(p.name, p.read_bytes()) for p in paths]))
    assert r.status_code == 200
    rows = r.json()
    assert [row["filename"] for row in rows] == [p.name for p in paths]
    for row, path in zip(rows, paths):
        assert set(row) == {
            "filename",
            "label",
            "probability",
            "probabilities",
            "uncertain",
            "unfamiliar",
            "unfamiliarity",
        }
        expected = classifier.predict(path)
        assert row["label"] == expected.label and row["uncertain"] == expected.uncertain
        assert row["unfamiliar"] == expected.unfamiliar
        assert row["unfamiliarity"] == pytest.approx(expected.unfamiliarity, rel=1e-4)
        assert list(row["probabilities"]) == classifier.classes
        assert row["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
        assert row["probability"] == pytest.approx(max(row["probabilities"].values()))


def test_every_supported_format_is_read_and_the_type_comes_from_the_bytes(client):
    im = draw_shape("square", 60, np.random.default_rng(3))
    rgba = im.convert("RGBA")
    rgba.putalpha(200)
    named = [
        ("a.png", encode(rgba, "PNG")),
        ("b.jpg", encode(im, "JPEG")),
        ("c.webp", encode(im, "WEBP")),
        ("d.bmp", encode(im, "BMP")),
        ("e.gif", encode(im.convert("P"), "GIF")),
        ("f.tif", encode(im, "TIFF")),
        ("g.png", encode(im.convert("L"), "PNG")),
        ("really-a-jpeg.txt", encode(im, "JPEG")),
    ]
    r = client.post("/predict", files=files(*named))
    assert r.status_code == 200, r.text
    assert [row["filename"] for row in r.json()] == [n for n, _ in named]


@pytest.mark.parametrize(
    "name,data",
    [
        ("notes.png", b"just some text, not pixels\n" * 10),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'),
        ("scan.jpg", b"%PDF-1.4\n1 0 obj << >> endobj\n"),
        ("icon.png", encode(Image.new("RGB", (16, 16), "red"), "ICO")),  # Pillow reads ICO; foldercnn does not
        ("photos.zip", b"PK\x03\x04" + bytes(100)),
    ],
)
def test_not_an_image_or_an_unsupported_type_is_415(client, name, data):
    r = client.post("/predict", files=files(("ok.png", shape_png()), (name, data)))
    assert r.status_code == 415
    assert r.json()["filename"] == name and "not an image" in r.json()["detail"]


@pytest.mark.parametrize(
    "name,data,reason",
    [
        ("cut.png", shape_png(size=200)[:300], "truncated"),
        ("cut.jpg", encode(draw_shape("circle", 200, np.random.default_rng(0)), "JPEG")[:-400], "truncated"),
        ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt|cannot decode"),
        ("garbage.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "corrupt|cannot decode"),
        ("bomb.png", png_claiming_size(40000, 40000), "too many pixels"),  # Pillow's own bomb check
        ("big.png", png_claiming_size(MAX_PIXELS // 9000 + 1, 9000), "too many pixels"),  # foldercnn's limit
        ("empty.png", b"", "empty"),
    ],
)
def test_corrupt_truncated_or_too_many_pixels_is_400(client, name, data, reason):
    r = client.post("/predict", files=files((name, data)))
    assert r.status_code == 400
    assert r.json()["filename"] == name and re.search(reason, r.json()["detail"]), r.json()


def test_size_and_count_limits_are_413(client):
    big = noise_png(420)  # ~0.5 MB of pixels that do not compress: over the 0.5 MB limit
    assert len(big) > 0.5 * MB
    r = client.post("/predict", files=files(("small.png", shape_png()), ("big.png", big)))
    assert r.status_code == 413 and r.json()["filename"] == "big.png" and "0.5 MB" in r.json()["detail"]
    r = client.post("/predict", files=files(*[(f"{i}.png", shape_png(seed=i)) for i in range(9)]))
    assert r.status_code == 413 and "at most 8" in r.json()["detail"]


def test_requests_without_images(client):
    r = client.post("/predict", data={"note": "no file here"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]  # a urlencoded form
    only_a_field = b'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n--xyz--\r\n'
    multipart = {"content-type": "multipart/form-data; boundary=xyz"}
    r = client.post("/predict", content=only_a_field, headers=multipart)
    assert r.status_code == 400 and "no image" in r.json()["detail"]
    r = client.post("/predict", json={"image": "hand.png"})
    assert r.status_code == 415
    r = client.post("/predict", content=b"--xyz\r\nnonsense", headers=multipart)
    assert r.status_code == 400
    assert client.get("/predict").status_code == 405


def test_a_filename_is_only_echoed_never_opened(client, classifier, model_path, shapes_dirs):
    """The name of a real file on disk with other bytes: the answer is about the bytes."""
    on_disk = sorted((shapes_dirs[1] / "square").glob("*.png"))[0]
    sent = sorted((shapes_dirs[1] / "circle").glob("*.png"))[0]
    r = client.post(
        "/predict", files=files((str(on_disk), sent.read_bytes()), ("../../../etc/passwd", sent.read_bytes()))
    )
    assert r.status_code == 200
    assert [row["filename"] for row in r.json()] == [str(on_disk), "../../../etc/passwd"]
    assert r.json()[0]["probabilities"] == pytest.approx(classifier.predict(sent).probabilities, abs=1e-5)
    r = client.post("/predict", files=files((str(model_path), b"not the model, just text")))
    assert r.status_code == 415


def test_nothing_uploaded_is_written_to_disk(classifier, tmp_path, monkeypatch):
    """Starlette's form parser would spool a file over 1 MB to the temp folder; ours keeps it in memory."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    with TestClient(create_app(classifier, workers=1)) as c:
        big = noise_png(700)
        assert len(big) > 1.2 * MB
        r = c.post("/predict", files=files(("big.png", big)))
        assert r.status_code == 200
    assert list(temp.iterdir()) == []


def test_a_burst_beyond_the_queue_is_answered_503_and_the_server_recovers(classifier):
    """workers=1 and no waiting room: two requests may hold an upload; the others are refused at once."""
    app = create_app(classifier, workers=1, max_waiting=0)
    body = files(*[(f"{i}.png", shape_png(size=300, seed=i)) for i in range(8)])

    async def burst():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                answers = await asyncio.gather(*[c.post("/predict", files=body) for _ in range(12)])
                after = await c.post("/predict", files=body)
        return answers, after

    # a thread of its own: the session's Playwright browser (sync API) may hold this thread's event loop
    with ThreadPoolExecutor(1) as thread:
        answers, after = thread.submit(asyncio.run, burst()).result(timeout=120)
    statuses = [a.status_code for a in answers]
    assert set(statuses) == {200, 503}, statuses
    busy = answers[statuses.index(503)]
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
    assert after.status_code == 200


def test_bad_options_are_clear_errors(classifier):
    for kw in ({"max_upload_mb": 0}, {"max_files": 0}, {"workers": 0}):
        with pytest.raises(foldercnn.FolderCNNError):
            create_app(classifier, **kw)


# --- a real server subprocess ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_path, tmp_path_factory):
    """One server for the API tests, with small limits and an empty temp folder of its own."""
    base = tmp_path_factory.mktemp("server")
    (base / "temp").mkdir()
    with running_server(
        model_path,
        "--max-upload-mb",
        1,
        "--max-files",
        4,
        "--workers",
        2,
        log=base / "server.log",
        env={"TMPDIR": str(base / "temp")},
    ) as s:
        s.temp = base / "temp"
        yield s


@pytest.mark.slow
def test_server_predicts_what_the_cli_predicts(server, model_path, shapes_dirs):
    path = sorted((shapes_dirs[1] / "triangle").glob("*.png"))[0]
    r = httpx.post(server.url + "/predict", files=files((path.name, path.read_bytes())), timeout=30)
    assert r.status_code == 200
    cli = run_cli("predict", model_path, path, "--json")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)[0]
    row = r.json()[0]
    assert row["label"] == expected["label"] and row["uncertain"] == expected["uncertain"]
    assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)
    assert "serving" in server.output() and server.url in server.output()


@pytest.mark.slow
def test_server_refuses_every_bad_upload_with_its_status_and_stays_up(server):
    good = shape_png()
    cases = [
        ("not an image", files(("notes.png", b"plain text\n" * 50)), 415),
        ("truncated", files(("cut.png", shape_png(size=200)[:300])), 400),
        ("corrupt", files(("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)), 400),
        ("bomb", files(("bomb.png", png_claiming_size(40000, 40000))), 400),
        ("too large", files(("big.png", noise_png(700))), 413),  # 1.4 MB > 1 MB
        ("too many files", files(*[(f"{i}.png", good) for i in range(5)]), 413),
        ("empty", files(("empty.png", b"")), 400),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for what, upload, status in cases:
            r = c.post("/predict", files=upload)
            assert r.status_code == status, (what, r.text)
            assert r.headers["content-type"] == "application/json" and r.json()["detail"], what
        r = c.post("/predict", content=good, headers={"content-type": "image/png"})
        assert r.status_code == 415
        # 20 MB declared: refused before reading; the body is read and dropped so the client gets the answer
        r = c.post("/predict", files=files(("huge.png", b"\x89PNG\r\n\x1a\n" + os.urandom(20 * MB))))
        assert r.status_code == 413 and "too large" in r.json()["detail"]

        def chunked_upload():  # no Content-Length: the limit is checked while the bytes arrive
            yield b'--b\r\nContent-Disposition: form-data; name="files"; filename="stream.png"\r\n\r\n'
            for _ in range(8):
                yield b"\x89PNG" + bytes(MB)
            yield b"\r\n--b--\r\n"

        r = c.post("/predict", content=chunked_upload(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["filename"] == "stream.png"
        assert c.get("/healthz").status_code == 200
        assert c.post("/predict", files=files(("ok.png", good))).status_code == 200
    assert server.proc.poll() is None
    assert list(server.temp.iterdir()) == [], "uploads must never be written to disk"
    assert "Traceback" not in server.output()


@pytest.mark.slow
def test_server_page_and_docs(server):
    assert "Use camera" in httpx.get(server.url + "/").text
    assert httpx.get(server.url + "/docs").status_code == 200
    assert httpx.get(server.url + "/model").json()["image_size"] > 0


@pytest.mark.slow
def test_a_missing_model_or_a_busy_port_is_a_clear_error(server, model_path, tmp_path):
    r = run_cli("serve", tmp_path / "nope.safetensors", "--port", free_port(), timeout=60)
    assert r.returncode == 2 and "foldercnn: error: model file not found" in r.stderr
    not_a_model = tmp_path / "model.safetensors"
    not_a_model.write_bytes(b"not a model")
    r = run_cli("serve", not_a_model, "--port", free_port(), timeout=60)
    assert r.returncode == 2 and "foldercnn: error:" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("serve", model_path, "--port", server.port, timeout=60)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig,codes", [(signal.SIGTERM, {0, -signal.SIGTERM}), (signal.SIGINT, {130})])
def test_signals_shut_the_server_down_cleanly(model_path, tmp_path, sig, codes):
    server = start_server(model_path, log=tmp_path / "server.log")
    try:
        wait_healthy(server)
        assert httpx.post(server.url + "/predict", files=files(("a.png", shape_png())), timeout=30).status_code == 200
        server.proc.send_signal(sig)
        assert server.proc.wait(timeout=20) in codes
    finally:
        stop(server)
    assert "Traceback" not in server.output()
    with socket.socket() as s:  # the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", server.port))
