"""Teaching (`foldercnn serve --teach`, `foldercnn teach`): the /teach API in-process, then a real server that
trains in a real subprocess and swaps its model while /predict is busy."""

import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from foldercnn.data.captures import burst_group_ids, merge_groups, parse_capture
from foldercnn.deploy.serve import create_app
from foldercnn.deploy.teach import TeachConfig
from testkit import Server, draw_shape, free_port, run_cli, stop, wait_healthy


def png(kind="circle", seed=0, size=48):
    buf = io.BytesIO()
    draw_shape(kind, size, np.random.default_rng(seed)).save(buf, "PNG")
    return buf.getvalue()


def files(*datas, name="frame.png"):
    return [("files", (name, d, "application/octet-stream")) for d in datas]


def listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


@pytest.fixture
def teach_dirs(tmp_path):
    return tmp_path / "teach", tmp_path / "runs"


@pytest.fixture
def client(teach_dirs, trained_model):
    config = TeachConfig(*teach_dirs, max_per_class=6, max_images=10)
    with TestClient(create_app(trained_model.model_path, max_upload_mb=0.5, max_files=4, workers=2, teach=config)) as c:
        yield c


# --- the folder: classes, captures, limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name, reason",
    [
        ("CON", "reserved device name"),
        ("nul", "reserved device name"),
        ("COM1.txt", "reserved device name"),
        ("rock.", "final dot"),
        ("cafe\u0301", "composed Unicode form"),
        ("\u202erock", "'\\u202e'"),
        ("", "needs a name"),
        ("   ", "needs a name"),
        (" rock", "spaces"),
        ("a/b", "'/'"),
        ("..", "dot"),
        (".hidden", "dot"),
        ("a\\b", "'\\\\'"),
        ("x" * 65, "at most 64"),
        ("a\x00b", "'\\x00'"),
        ("c:d", "':'"),
    ],
)
def test_bad_class_names_are_refused_and_nothing_is_written(client, teach_dirs, name, reason):
    body = json.dumps({"name": name})  # ASCII-escaped: a lone surrogate travels as JSON sends it, \\ud800
    r = client.post("/teach/classes", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and reason in r.json()["detail"], r.text
    assert not teach_dirs[0].exists() and not teach_dirs[1].exists()


def test_classes_are_added_listed_and_not_added_twice(client, teach_dirs):
    assert client.get("/teach/classes").json()["classes"] == []
    assert client.post("/teach/classes", json={"name": "thumbs up"}).status_code == 201
    assert client.post("/teach/classes", json={"name": "Ünïcode ✋"}).status_code == 201
    r = client.post("/teach/classes", json={"name": "thumbs up"})
    assert r.status_code == 409 and "exists already" in r.json()["detail"]
    listed = client.get("/teach/classes").json()
    assert [c["name"] for c in listed["classes"]] == ["thumbs up", "Ünïcode ✋"]
    assert listed["max_per_class"] == 6 and listed["min_per_class"] == 5
    assert sorted(p.name for p in teach_dirs[0].iterdir()) == ["thumbs up", "Ünïcode ✋"]
    assert client.post("/teach/classes", json={}).status_code == 422  # no name at all: FastAPI's own check


def test_captures_are_server_named_jpegs_without_metadata(client, teach_dirs):
    client.post("/teach/classes", json={"name": "rock"})
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    exif[0x010F] = "a camera maker"
    wide = Image.new("RGB", (60, 30), "red")
    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif)
    r = client.post(
        "/teach/classes/rock/images?burst=abc123", files=files(buf.getvalue(), png(), name="../../../etc/passwd.png")
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["burst"] == "abc123" and body["ids"] == ["cap-abc123-000001", "cap-abc123-000002"]
    saved = sorted((teach_dirs[0] / "rock").iterdir())
    assert [p.name for p in saved] == ["cap-abc123-000001.jpg", "cap-abc123-000002.jpg"]
    with Image.open(saved[0]) as im:
        assert im.format == "JPEG" and im.size == (30, 60)  # stored upright
        assert not im.getexif()  # no camera metadata (or location) kept
    # the same burst continues its numbering; without a burst the server makes one
    assert client.post("/teach/classes/rock/images?burst=abc123", files=files(png())).json()["ids"] == [
        "cap-abc123-000003"
    ]
    other = client.post("/teach/classes/rock/images", files=files(png())).json()
    assert other["burst"] != "abc123" and parse_capture(other["ids"][0] + ".jpg")[0] == other["burst"]
    listed = client.get("/teach/classes").json()["classes"][0]
    assert listed["images"] == 4 and listed["bursts"] == 2 and listed["captures"][0] == other["ids"][0]
    got = client.get(f"/teach/classes/rock/images/{other['ids'][0]}")
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    assert listing(teach_dirs[0].parent) == sorted(
        ["teach", "teach/rock", "runs", "runs/captures.json"]
        + [f"teach/rock/{p.name}" for p in (teach_dirs[0] / "rock").iterdir()]
    )


def test_bad_uploads_are_refused_as_predict_refuses_them(client, teach_dirs):
    client.post("/teach/classes", json={"name": "rock"})
    cases = [
        (files(b"hello, not an image"), 415),
        (files(png()[:40]), 400),
        (files(b""), 400),
        (files(png(), png(), png(), png(), png()), 413),  # more than --max-files (4)
        (files(b"\x89PNG\r\n\x1a\n" + os.urandom(600_000)), 413),
    ]  # over --max-upload-mb (0.5)
    for sent, status in cases:
        r = client.post("/teach/classes/rock/images", files=sent)
        assert r.status_code == status, (status, r.text)
    # one bad file among good ones: nothing of the request is saved
    assert client.post("/teach/classes/rock/images", files=files(png(), b"junk")).status_code == 415
    assert client.post("/teach/classes/rock/images?burst=UPPER", files=files(png())).status_code == 400
    assert list((teach_dirs[0] / "rock").iterdir()) == []


def test_caps_per_class_and_in_all_are_clear_errors(client, teach_dirs):
    for name in ("a", "b"):
        client.post("/teach/classes", json={"name": name})
    assert client.post("/teach/classes/a/images", files=files(*[png(seed=i) for i in range(4)])).status_code == 201
    r = client.post("/teach/classes/a/images", files=files(png(), png(), png()))
    assert r.status_code == 409 and "at most 6 per class (--teach-max-per-class)" in r.json()["detail"]
    assert client.post("/teach/classes/a/images", files=files(png(), png())).status_code == 201
    assert client.post("/teach/classes/b/images", files=files(*[png(seed=i) for i in range(4)])).status_code == 201
    r = client.post("/teach/classes/b/images", files=files(png()))
    assert r.status_code == 409 and "at most 10 in all (--teach-max-images)" in r.json()["detail"]
    assert sum(c["images"] for c in client.get("/teach/classes").json()["classes"]) == 10


def test_path_tricks_never_reach_outside_the_folder(client, teach_dirs, tmp_path):
    client.post("/teach/classes", json={"name": "rock"})
    own = teach_dirs[0] / "rock" / "my-own-photo.png"
    own.write_bytes(png())
    outside = tmp_path / "outside"
    outside.mkdir()
    (teach_dirs[0] / "linked").symlink_to(outside)
    for url in ("/teach/classes/..%2F..%2Foutside/images", "/teach/classes/.%2E/images", "/teach/classes/nope/images"):
        r = client.post(url, files=files(png()))
        assert r.status_code in (400, 404), (url, r.status_code, r.text)
    r = client.post("/teach/classes/linked/images", files=files(png()))
    assert r.status_code == 409 and "link to outside" in r.json()["detail"]
    for image_id in ("my-own-photo", "..%2Fmy-own-photo", "cap-x-000001", "%2E%2E"):
        assert client.delete(f"/teach/classes/rock/images/{image_id}").status_code == 404
        assert client.get(f"/teach/classes/rock/images/{image_id}").status_code == 404
    assert own.read_bytes() == png() and list(outside.iterdir()) == []
    saved = client.post("/teach/classes/rock/images", files=files(png())).json()["ids"][0]
    assert client.delete(f"/teach/classes/rock/images/{saved}").json() == {"class": "rock", "deleted": saved}
    assert sorted(p.name for p in (teach_dirs[0] / "rock").iterdir()) == ["my-own-photo.png"]


def test_training_refuses_what_cannot_work(client):
    r = client.post("/teach/train")
    assert r.status_code == 409 and "at least two classes" in r.json()["detail"]
    for name in ("a", "b"):
        client.post("/teach/classes", json={"name": name})
    client.post("/teach/classes/a/images", files=files(*[png(seed=i) for i in range(4)]))
    client.post("/teach/classes/a/images", files=files(png(seed=9)))
    r = client.post("/teach/train")
    assert r.status_code == 409 and "at least 5 images; add more to: b" in r.json()["detail"]
    assert client.get("/teach/train").json() is None
    assert client.get("/teach/train/nope").status_code == 404


def test_teaching_is_off_unless_asked(trained_model):
    with TestClient(create_app(trained_model.model_path)) as c:
        assert c.get("/teach/classes").status_code == 404
        assert "/teach/train" not in c.get("/openapi.json").json()["paths"]
        assert 'data-teach="off"' in c.get("/").text


def test_bursts_stay_on_one_side_of_the_split():
    paths = [f"/d/rock/cap-aa-{i:06d}.jpg" for i in range(1, 4)] + [
        "/d/rock/photo.jpg",
        "/d/rock/cap-bb-000001.jpg",
        "/d/paper/cap-aa-000001.jpg",
    ]
    ids = burst_group_ids(paths)
    assert ids[0] == ids[1] == ids[2] and len(set(ids[3:].tolist())) == 3 and ids[5] != ids[0]
    merged = merge_groups(ids, np.array([0, 1, 2, 4, 4, 5]))  # a near-duplicate pair joins photo.jpg and bb
    assert merged[3] == merged[4] and merged[0] == merged[2] and merged[0] != merged[3]


# --- a real server -------------------------------------------------------------------------------------


def start_teach_server(command, *args, log, cwd=None, env=None):
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.cli", command, *map(str, args), "--port", str(port)],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    out.close()
    server = Server(proc, port, log)
    wait_healthy(server)
    return server


def fast_teach_server(trained_model, data, tmp_path, env=None):
    """`foldercnn serve MODEL --teach DATA` training the fast recipe, runs under tmp_path/runs."""
    return start_teach_server(
        "serve",
        trained_model.model_path,
        "--teach",
        data,
        "--teach-runs",
        tmp_path / "runs",
        "--teach-recipe",
        "fast",
        log=tmp_path / "serve.log",
        env=env,
    )


def one_class_broken(data, count):
    """dots/ with `count` circles, blocks/ with `count` files that are counted as images but cannot be decoded."""
    for name in ("dots", "blocks"):
        (data / name).mkdir(parents=True)
    for i in range(count):
        draw_shape("circle", 40, np.random.default_rng(i)).save(data / "dots" / f"{i}.png")
        (data / "blocks" / f"{i}.png").write_bytes(b"broken")


def wait_job(url, job_id, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/teach/train/{job_id}").json()
        if job["state"] != "running":
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still running after {timeout} s: {job}")


@pytest.mark.slow
def test_teach_from_nothing_train_and_swap_while_predict_is_busy(tmp_path, trained_model):
    data, runs = tmp_path / "mine", tmp_path / "runs"
    server = start_teach_server(
        "serve",
        trained_model.model_path,
        "--teach",
        data,
        "--teach-runs",
        runs,
        "--teach-recipe",
        "fast",
        log=tmp_path / "serve.log",
    )
    try:
        url = server.url
        old_classes = httpx.get(url + "/model").json()["classes"]
        for name, kind in (("dots", "circle"), ("blocks", "square")):
            assert httpx.post(url + "/teach/classes", json={"name": name}).status_code == 201
            for burst in ("one", "two", "three"):  # three recordings per class
                r = httpx.post(
                    f"{url}/teach/classes/{name}/images?burst={burst}",
                    files=files(*[png(kind, seed=hash((burst, i)) % 1000) for i in range(4)]),
                )
                assert r.status_code == 201, r.text
        # cross-site requests and foreign host names are refused
        r = httpx.post(url + "/teach/train", headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "another site" in r.json()["detail"]
        r = httpx.get(url + "/teach/classes", headers={"Host": f"evil.example:{server.port}"})
        assert r.status_code == 403 and "addressed to this computer" in r.json()["detail"]

        answers, stop_hammer = [], []

        def hammer():  # two clients, each sending frames like the camera view of the page (a few per second)
            while not stop_hammer:
                r = httpx.post(url + "/predict", files=files(png("circle", seed=len(answers))))
                answers.append((r.status_code, tuple(sorted(r.json()[0]["probabilities"]))))
                time.sleep(0.3)

        with ThreadPoolExecutor(2) as pool:
            busy = [pool.submit(hammer) for _ in range(2)]
            try:
                r = httpx.post(url + "/teach/train", headers={"Origin": url})
                assert r.status_code == 202, r.text
                job = r.json()
                again = httpx.post(url + "/teach/train")
                assert again.status_code == 409 and job["id"] in again.json()["detail"]
                done = wait_job(url, job["id"])
                time.sleep(1.0)
            finally:
                stop_hammer.append(True)
            for f in busy:
                f.result()
        assert done["state"] == "done", done
        result = done["result"]
        assert result["classes"] == ["blocks", "dots"] and 0 <= result["val_accuracy"] <= 1 and result["n_val"] >= 2
        assert result["note"] is None  # three bursts per class: the held-out figure is honest
        lo, hi = result["val_ci95"]  # the 95% Wilson interval of the held-out figure, and what it rests on
        assert 0 <= lo <= result["val_accuracy"] <= hi <= 1 and hi - lo > 0.2  # a handful of images: wide
        per_class = result["per_class"]
        assert sorted(per_class) == ["blocks", "dots"]
        assert all(c["train"] + c["held_out"] == 12 and c["held_out"] >= 1 for c in per_class.values())
        assert sum(c["held_out"] for c in per_class.values()) == result["n_val"]
        # the bursts the held-out frames come from (of the three recorded per class)
        assert all(1 <= c["held_out_bursts"] <= min(3, c["held_out"]) for c in per_class.values())
        assert result["val_bursts"] == sum(c["held_out_bursts"] for c in per_class.values())
        # every answer came from one model or the other, and the new one is served without a restart
        assert {status for status, _ in answers} == {200}
        assert {classes for _, classes in answers} <= {tuple(sorted(old_classes)), ("blocks", "dots")}
        assert answers[-1][1] == ("blocks", "dots")
        assert httpx.get(url + "/model").json()["classes"] == ["blocks", "dots"]
        assert httpx.get(url + "/teach/train").json()["id"] == job["id"]
        # files landed only in the teaching folder and the run folder
        run_dir = Path(done["run_dir"])
        assert (
            run_dir.parent == runs and (run_dir / "model.safetensors").is_file() and (run_dir / "report.html").is_file()
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "runs", "serve.log"]
        assert all(parse_capture(p.name) for p in data.rglob("*") if p.is_file())
    finally:
        stop(server)


@pytest.mark.slow
def test_a_failed_job_keeps_the_old_model_and_says_why(tmp_path, trained_model):
    data = tmp_path / "mine"
    one_class_broken(data, 5)
    server = fast_teach_server(trained_model, data, tmp_path)
    try:
        url = server.url
        r = httpx.post(url + "/teach/train")
        assert r.status_code == 202, r.text
        job = wait_job(url, r.json()["id"])
        assert job["state"] == "failed" and "blocks" in job["error"] and "Traceback" not in job["error"], job
        assert httpx.get(url + "/model").json()["classes"] == ["circle", "square", "triangle"]
        assert httpx.post(url + "/predict", files=files(png())).status_code == 200
    finally:
        stop(server)


def test_remote_teaching_needs_its_own_flag(tmp_path, trained_model):
    r = run_cli(
        "serve", trained_model.model_path, "--teach", tmp_path / "mine", "--host", "0.0.0.0", "--port", free_port()
    )
    assert r.returncode == 2 and "--allow-remote-teach" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("teach", tmp_path / "mine", "--teach-runs", tmp_path / "mine" / "runs", "--port", free_port())
    assert r.returncode == 2 and "inside the data folder" in r.stderr
    r = run_cli("teach", tmp_path / "mine", "--teach-recipe", "nope", "--port", free_port())
    assert r.returncode == 2 and "unknown recipe 'nope'" in r.stderr
    assert not (tmp_path / "mine").exists()


def test_names_that_clash_elsewhere_are_refused(client, teach_dirs):
    """On Windows and macOS `Rock` and `rock` are one folder: the second is refused."""
    assert client.post("/teach/classes", json={"name": "rock"}).status_code == 201
    for twin in ("Rock", "ROCK"):
        r = client.post("/teach/classes", json={"name": twin})
        assert r.status_code == 409 and "only in case" in r.json()["detail"]
    assert [p.name for p in teach_dirs[0].iterdir()] == ["rock"]


def test_a_burst_id_with_a_trailing_newline_is_refused(client, teach_dirs):
    client.post("/teach/classes", json={"name": "rock"})
    r = client.post("/teach/classes/rock/images?burst=abc%0A", files=files(png()))
    assert r.status_code == 400 and "burst" in r.json()["detail"]
    assert list((teach_dirs[0] / "rock").iterdir()) == []
    assert parse_capture("cap-abc-000001.jpg\n") is None


def test_a_capture_that_is_a_link_is_never_served(client, teach_dirs, tmp_path):
    client.post("/teach/classes", json={"name": "rock"})
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the web")
    (teach_dirs[0] / "rock" / "cap-evil2-000001.jpg").symlink_to(secret)
    assert client.get("/teach/classes/rock/images/cap-evil2-000001").status_code == 404
    assert client.delete("/teach/classes/rock/images/cap-evil2-000001").status_code == 404
    assert secret.read_text() == "not for the web"


def test_a_users_own_file_named_like_a_capture_is_not_a_capture(client, teach_dirs):
    client.post("/teach/classes", json={"name": "paper"})
    mine = teach_dirs[0] / "paper" / "cap-userfile-000001.jpg"
    mine.write_bytes(png())
    listed = client.get("/teach/classes").json()["classes"][0]
    assert listed["captures"] == [] and listed["other_images"] == 1
    assert client.delete("/teach/classes/paper/images/cap-userfile-000001").status_code == 404
    assert mine.read_bytes() == png()
    made = client.post("/teach/classes/paper/images", files=files(png(seed=3))).json()["ids"][0]
    assert client.get("/teach/classes").json()["classes"][0]["captures"] == [made]
    assert client.delete(f"/teach/classes/paper/images/{made}").status_code == 200


def test_a_lone_surrogate_in_a_class_name_is_a_422_not_a_500(client, teach_dirs):
    r = client.post("/teach/classes", content='{"name": "\\ud800"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "name"]
    assert not teach_dirs[0].exists()


@pytest.mark.slow
def test_a_named_pipe_in_the_teaching_folder_does_not_stall_a_job(tmp_path, trained_model):
    """A FIFO among the images made the training subprocess block in open() for ever (every Train then 409):
    it is skipped with its reason, the job ends, and no temporary decode-cache file is left behind."""
    data = tmp_path / "mine"
    for name, kind in (("dots", "circle"), ("blocks", "square")):
        (data / name).mkdir(parents=True)
        for i in range(6):
            draw_shape(kind, 40, np.random.default_rng(i)).save(data / name / f"{i}.png")
    os.mkfifo(data / "dots" / "pipe.png")
    cache = tmp_path / "cache"
    server = fast_teach_server(trained_model, data, tmp_path, env={"FOLDERCNN_CACHE": str(cache)})
    try:
        r = httpx.post(server.url + "/teach/train")
        assert r.status_code == 202, r.text
        job = wait_job(server.url, r.json()["id"], timeout=240)
        assert job["state"] == "done", job
        assert not list(cache.rglob("*.tmp"))
    finally:
        stop(server)
