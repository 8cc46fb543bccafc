"""The warm trainer of teaching: features kept per capture (training/cached_probe.py), the leave-one-burst-out
estimate, and the worker process (deploy/teach_worker.py) behind a real teaching server."""

import io
import os
import signal
import time

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from foldercnn.data.captures import capture_name
from foldercnn.data.folders import scan_folder
from foldercnn.errors import FolderCNNError
from foldercnn.models.file import read_metadata
from foldercnn.training.cached_probe import (
    RIDGE,
    Backbone,
    burst_estimates,
    cacheable,
    left_out_guesses,
    train_cached,
)
from foldercnn.training.options import TrainOptions
from foldercnn.training.transfer import FullBatchAdam, _fit_heads, _head
from test_teach import start_teach_server, wait_job
from testkit import draw_shape, stop

KINDS = {"dots": "circle", "blocks": "square"}


def capture_bytes(kind, seed, size=64):
    buf = io.BytesIO()
    draw_shape(kind, size, np.random.default_rng(seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_captures(root, bursts=("aa", "bb"), frames=4):
    """root/<class>/cap-<burst>-<n>.jpg for both classes, as the Teach panel names them."""
    for c, (name, kind) in enumerate(KINDS.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for b, burst in enumerate(bursts):
            for n in range(1, frames + 1):
                data = capture_bytes(kind, seed=1000 * c + 100 * b + n)
                (root / name / capture_name(burst, n)).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def options():
    return TrainOptions.of(recipe="probe", seed=0, resume="ignore")


@pytest.fixture(scope="module")
def backbone(options, tmp_path_factory):
    return Backbone(options.make_recipe(), tmp_path_factory.mktemp("features"))


def test_only_a_frozen_probe_on_clean_views_trains_on_kept_features():
    for plain in (
        TrainOptions.of(recipe="probe"),
        TrainOptions.of(recipe="transfer", fine_tune=False),
        TrainOptions.of(recipe="hands"),  # hands: views of landmarks
    ):
        assert cacheable(plain.make_recipe(), plain), plain.recipe
    for options in (
        TrainOptions.of(recipe="transfer"),  # it fine-tunes by default: the backbone changes
        TrainOptions.of(recipe="probe", fine_tune=True),
        TrainOptions.of(recipe="robust"),  # random augmented views
        TrainOptions.of(recipe="fast"),  # no frozen backbone
        TrainOptions.of(recipe="hands", val_dir="elsewhere"),  # a validation folder is not kept
    ):
        assert not cacheable(options.make_recipe(), options), options.recipe


def test_the_written_out_adam_steps_as_torch_adam_does():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 8, generator=g), torch.arange(40) % 2
    ours, theirs = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)
    theirs.load_state_dict(ours.state_dict())
    opts = FullBatchAdam(ours.parameters(), lr=0.01), torch.optim.Adam(theirs.parameters(), lr=0.01)
    for _ in range(30):
        for model, opt in zip((ours, theirs), opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    torch.testing.assert_close(ours.weight, theirs.weight)
    torch.testing.assert_close(ours.bias, theirs.bias)
    assert not torch.allclose(ours.weight, torch.nn.Linear(8, 2).weight)


def test_heads_fitted_together_equal_heads_fitted_alone():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 16, generator=g), torch.arange(60) % 3
    decays = (1e-4, 1e-1, 3.0)
    together = _fit_heads(x, y, 3, decays, 50, seed=4)
    for j, wd in enumerate(decays):
        alone = _head(_fit_heads(x, y, 3, (wd,), 50, seed=4), 0, 3)
        torch.testing.assert_close(_head(together, j, 3).weight, alone.weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_head(together, j, 3).bias, alone.bias, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_head(together, 0, 3).weight, _head(together, 2, 3).weight, atol=1e-3)


def test_features_are_computed_once_per_file_content_and_recomputed_when_dropped(backbone, tmp_path):
    data = write_captures(tmp_path / "data")
    before = backbone.computed
    records = backbone.records(scan_folder(data))
    assert backbone.computed - before == 16 and records.computed == 16 and len(records.files) == 16
    again = backbone.records(scan_folder(data))
    assert again.computed == 0 and backbone.computed - before == 16
    torch.testing.assert_close(again.clean, records.clean)
    # a renamed (moved) capture is the same content: nothing to compute; a dropped one is computed anew
    first = data / "dots" / capture_name("aa", 1)
    first.rename(data / "dots" / capture_name("cc", 1))
    assert backbone.records(scan_folder(data)).computed == 0
    backbone.store.drop(backbone.digests([data / "dots" / capture_name("cc", 1)])[0])
    assert backbone.records(scan_folder(data)).computed == 1


def test_an_unreadable_capture_is_skipped_and_said(backbone, tmp_path):
    data = write_captures(tmp_path / "data")
    (data / "dots" / capture_name("zz", 1)).write_bytes(b"not a jpeg")
    records = backbone.records(scan_folder(data))
    assert len(records.files) == 16 and [str(p).endswith("cap-zz-000001.jpg") for p, _ in records.skipped] == [True]


def test_the_estimate_leaves_each_burst_out(backbone, tmp_path):
    data = write_captures(tmp_path / "two", bursts=("aa", "bb", "cc"))
    est = burst_estimates(backbone.records(scan_folder(data)))
    assert set(est) == {"dots", "blocks"}
    for e in est.values():  # circles and squares: every left-out burst is recognised
        assert e["bursts"] == e["groups"] == 3 and e["frames"] == 12 and e["accuracy"] == 1.0
    one = write_captures(tmp_path / "one", bursts=("aa",))
    est = burst_estimates(backbone.records(scan_folder(one)))
    assert all(e["accuracy"] is None and e["bursts"] == e["groups"] == 1 for e in est.values())


def test_one_inverse_gives_what_a_fit_per_left_out_group_gives():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(30, 6, generator=g) + torch.arange(30).remainder(3)[:, None]
    labels = (torch.arange(30) % 3).numpy()
    groups = np.arange(30) // 3
    fast = left_out_guesses(features, labels, 3, groups)
    x = torch.nn.functional.normalize(features.double(), dim=1)
    x = torch.cat([x, torch.ones(30, 1, dtype=x.dtype)], 1)
    y = torch.nn.functional.one_hot(torch.as_tensor(labels), 3).double()
    for group in range(10):
        test, train = groups == group, groups != group
        xt = x[torch.from_numpy(train)]
        w = xt.T @ torch.linalg.solve(xt @ xt.T + RIDGE * torch.eye(len(xt), dtype=x.dtype), y[torch.from_numpy(train)])
        np.testing.assert_array_equal(fast[test], (x[torch.from_numpy(test)] @ w).argmax(1).numpy())
    assert 0 < (fast == labels).mean() < 1  # a case where leaving out matters


def test_a_class_that_looks_like_another_is_estimated_low(backbone, tmp_path):
    data = write_captures(tmp_path / "data", bursts=("aa", "bb", "cc"))
    (data / "more").mkdir()
    for b, burst in enumerate(("aa", "bb", "cc")):  # squares again, under another name
        for n in range(1, 5):
            (data / "more" / capture_name(burst, n)).write_bytes(capture_bytes("square", seed=5000 + 10 * b + n))
    est = burst_estimates(backbone.records(scan_folder(data)))
    assert est["dots"]["accuracy"] == 1.0
    assert est["more"]["accuracy"] < 0.9 and est["blocks"]["accuracy"] < 0.9


def test_a_job_on_kept_features_writes_a_complete_run(backbone, options, tmp_path):
    data = write_captures(tmp_path / "data", bursts=("aa", "bb", "cc"))
    model_path = train_cached(data, tmp_path / "run", options, backbone)
    meta = read_metadata(model_path)
    assert meta["classes"] == ["blocks", "dots"] and meta["architecture"] == "effnet-lite0"
    assert meta["metrics"]["n_train"] + meta["metrics"]["n_val"] == 24
    assert sum(meta["data"]["val_bursts"].values()) >= 2  # the held-out captures and their bursts are told
    assert "temperature" in meta["calibration"]
    for name in ("history.csv", "report.html", "curves.png", "options.json"):
        assert (tmp_path / "run" / name).is_file(), name
    import foldercnn

    classifier = foldercnn.load(model_path)
    answers = classifier.predict_many([str(p) for p in sorted((data / "dots").iterdir())])
    assert all(a.label == "dots" for a in answers), answers


def test_a_job_on_kept_features_refuses_a_class_without_usable_images(backbone, options, tmp_path):
    data = write_captures(tmp_path / "data")
    for n in range(1, 6):
        (data / "blocks" / capture_name("zz", n)).write_bytes(b"broken")
    for f in (data / "blocks").glob("cap-aa-*"):
        f.unlink()
    for f in (data / "blocks").glob("cap-bb-*"):
        f.unlink()
    with pytest.raises(FolderCNNError, match="no usable images in the class folder.*blocks"):
        train_cached(data, tmp_path / "run", options, backbone)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_job_on_kept_features_matches_the_cold_job(backbone, options, tmp_path):
    """Same folder, same seed: train_folder (decoding, features in the job) and train_cached agree."""
    import foldercnn

    data = write_captures(tmp_path / "data", bursts=("aa", "bb", "cc"))
    warm = read_metadata(train_cached(data, tmp_path / "warm", options, backbone))
    cold = foldercnn.train(data, tmp_path / "cold", options, log=lambda *a: None)
    cold_meta = read_metadata(cold.model_path)
    assert warm["data"]["counts"] == cold_meta["data"]["counts"]
    assert warm["metrics"]["val_accuracy"] == cold_meta["metrics"]["val_accuracy"]
    a = foldercnn.load(tmp_path / "warm" / "model.safetensors").predict_many([str(p) for p in data.rglob("*.jpg")])
    b = foldercnn.load(cold.model_path).predict_many([str(p) for p in data.rglob("*.jpg")])
    assert [x.label for x in a] == [x.label for x in b]
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b)) < 0.02


# --- the worker behind a real server ----------------------------------------------------------------------


def post_bursts(url, bursts=("aa", "bb"), frames=4):
    existing = {c["name"] for c in httpx.get(url + "/teach/classes").json()["classes"]}
    for c, (name, kind) in enumerate(KINDS.items()):
        if name not in existing:
            assert httpx.post(url + "/teach/classes", json={"name": name}).status_code == 201
        for b, burst in enumerate(bursts):
            datas = [capture_bytes(kind, seed=1000 * c + 100 * b + n) for n in range(1, frames + 1)]
            r = httpx.post(
                f"{url}/teach/classes/{name}/images?burst={burst}",
                files=[("files", (f"{n}.jpg", d, "image/jpeg")) for n, d in enumerate(datas)],
                timeout=60,
            )
            assert r.status_code == 201, r.text


def wait_featurised(url, images, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        overview = httpx.get(url + "/teach/classes", timeout=30).json()
        warm = overview["warm"]
        if warm["up_to_date"] and warm["images_featurised"] == images:
            return overview
        time.sleep(0.2)
    raise AssertionError(f"features not up to date after {timeout} s: {overview}")


def kept_records(runs):
    return sorted((runs / "features").rglob("*.safetensors"))


def teach(tmp_path):
    return start_teach_server(
        "teach", tmp_path / "data", "--teach-runs", tmp_path / "runs", log=tmp_path / f"teach-{time.time()}.log"
    )


@pytest.mark.slow
def test_features_follow_captures_and_survive_a_restart(tmp_path):
    runs = tmp_path / "runs"
    server = teach(tmp_path)
    try:
        post_bursts(server.url)
        overview = wait_featurised(server.url, 16)
        assert overview["warm"]["features_computed"] == 16 and len(kept_records(runs)) == 16
        assert overview["warm"]["worker_rss_mb"] > 0
        for c in overview["classes"]:  # two bursts each: an estimate per class
            assert c["estimate"]["bursts"] == 2 and c["estimate"]["accuracy"] == 1.0, c
        victim = overview["classes"][0]["captures"][0]
        r = httpx.delete(f"{server.url}/teach/classes/{overview['classes'][0]['name']}/images/{victim}")
        assert r.status_code == 200
        overview = wait_featurised(server.url, 15)
        assert len(kept_records(runs)) == 15  # its features went with it
        job = wait_job(server.url, httpx.post(server.url + "/teach/train").json()["id"])
        assert job["state"] == "done", job
        assert job["served_seconds"] is not None and job["served_seconds"] <= job["seconds"]
        assert job["result"]["n_train"] + job["result"]["n_val"] == 15
        assert httpx.get(server.url + "/model").json()["classes"] == ["blocks", "dots"]
    finally:
        stop(server)
    server = teach(tmp_path)  # a restart computes nothing that is kept
    try:
        overview = wait_featurised(server.url, 15)
        assert overview["warm"]["features_computed"] == 0 and len(kept_records(runs)) == 15
        job = wait_job(server.url, httpx.post(server.url + "/teach/train").json()["id"])
        assert job["state"] == "done", job
    finally:
        stop(server)


@pytest.mark.slow
def test_a_worker_killed_during_a_job_fails_it_and_the_next_job_starts_a_new_one(tmp_path):
    server = teach(tmp_path)
    try:
        post_bursts(server.url)
        overview = wait_featurised(server.url, 16)
        first = wait_job(server.url, httpx.post(server.url + "/teach/train").json()["id"])
        assert first["state"] == "done", first
        served = httpx.get(server.url + "/model").json()
        pid = overview["warm"]["worker_pid"]
        os.kill(pid, signal.SIGSTOP)  # frozen: the job below is surely in flight when it is killed
        job = httpx.post(server.url + "/teach/train").json()
        time.sleep(0.5)
        assert httpx.get(f"{server.url}/teach/train/{job['id']}").json()["state"] == "running"
        os.kill(pid, signal.SIGKILL)
        failed = wait_job(server.url, job["id"], timeout=30)
        assert failed["state"] == "failed" and "worker stopped" in failed["error"], failed
        assert "keeps serving" in failed["error"]
        assert httpx.get(server.url + "/model").json() == served  # the old model keeps serving
        r = httpx.post(server.url + "/predict", files=[("files", ("x.jpg", capture_bytes("circle", 7)))])
        assert r.status_code == 200 and r.json()[0]["label"] == "dots"
        again = wait_job(server.url, httpx.post(server.url + "/teach/train").json()["id"])
        assert again["state"] == "done", again
        new_pid = httpx.get(server.url + "/teach/classes").json()["warm"]["worker_pid"]
        assert new_pid not in (None, pid)
    finally:
        stop(server)
