"""The warm trainer for the hands recipe: the hand found in each capture kept per file (training/cached_probe.py,
HandBackbone), the estimate and the job on them, the teaching server's worker running MediaPipe Hands.

Generated images hold no real hand, so the hands the finder would find are planted in its cache by pixel content
(data/hands_cache.py): every path that finds hands, the cold job's and prediction's included, reads them there.
An image without a planted hand goes through MediaPipe for real and has none."""

import httpx
import numpy as np
import pytest
import torch

import foldercnn
from foldercnn.data import hands
from foldercnn.data.decode import decode_images
from foldercnn.data.folders import scan_folder
from foldercnn.data.hands import FoundHands
from foldercnn.data.hands_cache import HandCache, _record, image_key
from foldercnn.models.file import read_metadata
from foldercnn.models.preprocess import decode_size
from foldercnn.training.cached_probe import HandBackbone, burst_estimates, train_cached
from foldercnn.training.options import TrainOptions
from test_teach import start_teach_server, wait_job
from test_teach_warm import KINDS, capture_bytes, kept_records, wait_featurised, write_captures
from testkit import stop

pytestmark = pytest.mark.skipif(not hands.available(), reason="onnxruntime is not installed (foldercnn[hands])")

GESTURES = {name: np.random.default_rng(c).normal(0, 0.04, (21, 3)) for c, name in enumerate(KINDS)}


def plant_hands(paths, label_of, seed=0):
    """Put a hand of each image's gesture (with a little joint noise) in the finder's cache, keyed by the image's
    pixels as the hands recipe decodes them."""
    rng = np.random.default_rng(seed)
    array, good, _ = decode_images([str(p) for p in paths], decode_size(256, "letterbox"), desc=None)
    cache, found = HandCache(), FoundHands.empty(1)
    for k, i in enumerate(good):
        world = GESTURES[label_of(paths[i])] + rng.normal(0, 0.002, (21, 3))
        found.world[0], found.stage[0], found.score[0], found.right[0] = world, 0, 0.9, True
        found.points[0] = np.concatenate([world[:, :2] * 2 + 0.5, world[:, 2:]], 1)
        cache.put(image_key(np.asarray(array[k])), _record(found, 0))


def hand_captures(root, bursts=("aa", "bb", "cc")):
    data = write_captures(root, bursts=bursts)
    paths = sorted(data.rglob("cap-*.jpg"))
    plant_hands(paths, lambda p: p.parent.name)
    return data


@pytest.fixture(scope="module")
def options():
    return TrainOptions.of(recipe="hands", seed=0, resume="ignore")


@pytest.fixture(scope="module")
def backbone(options, tmp_path_factory):
    return HandBackbone(options.make_recipe(), tmp_path_factory.mktemp("hand-records"))


def test_hands_are_kept_per_capture_and_recomputed_when_dropped(backbone, tmp_path):
    data = hand_captures(tmp_path / "data", bursts=("aa", "bb"))
    records = backbone.records(scan_folder(data))
    assert records.computed == 16 and records.clean.shape == (16, backbone.dim)
    assert records.clean[:, 0].min() == 0  # every planted hand was found (stage 0), none is missing
    again = backbone.records(scan_folder(data))
    assert again.computed == 0
    torch.testing.assert_close(again.clean, records.clean)
    backbone.store.drop(backbone.digests([next(data.rglob("cap-aa-*.jpg"))])[0])
    assert backbone.records(scan_folder(data)).computed == 1


def test_the_estimate_counts_a_frame_without_a_hand_as_wrong(backbone, tmp_path):
    data = hand_captures(tmp_path / "data")
    est = burst_estimates(backbone.records(scan_folder(data)))
    assert all(e["accuracy"] == 1.0 and e["bursts"] == 3 for e in est.values()), est
    (data / "dots" / "cap-dd-000001.jpg").write_bytes(capture_bytes("circle", 99))  # no hand planted: none found
    records = backbone.records(scan_folder(data))
    assert records.clean[:, 0].min() == -1
    est = burst_estimates(records)
    assert est["dots"]["frames"] == 13 and est["dots"]["accuracy"] == pytest.approx(12 / 13), est
    assert est["blocks"]["accuracy"] == 1.0


def test_a_job_on_kept_hands_matches_the_cold_job(backbone, options, tmp_path):
    data = hand_captures(tmp_path / "data")
    (data / "dots" / "cap-dd-000001.jpg").write_bytes(capture_bytes("circle", 99))  # one without a hand
    warm_path = train_cached(data, tmp_path / "warm", options, backbone)
    cold = foldercnn.train(data, tmp_path / "cold", options, log=lambda *a: None)
    warm, cold_meta = read_metadata(warm_path), read_metadata(cold.model_path)
    assert warm["architecture"] == "hand-landmarks" and warm["data"]["counts"] == cold_meta["data"]["counts"]
    assert warm["metrics"]["val_accuracy"] == cold_meta["metrics"]["val_accuracy"]
    paths = sorted(str(p) for p in data.rglob("*.jpg"))
    a, b = foldercnn.load(warm_path).predict_many(paths), foldercnn.load(cold.model_path).predict_many(paths)
    assert [x.label for x in a] == [x.label for x in b]
    assert [x.label for x in a].count(None) == 1  # the image without a hand gets no answer from either
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b)) < 0.02


@pytest.mark.slow
def test_a_teaching_server_keeps_hands_warm_and_trains_on_them(tmp_path):
    data, runs = hand_captures(tmp_path / "data"), tmp_path / "runs"

    def teach():
        return start_teach_server(
            "teach", data, "--teach-recipe", "hands", "--teach-runs", runs, log=tmp_path / "teach.log"
        )

    server = teach()
    try:
        overview = wait_featurised(server.url, 24)
        assert overview["warm"]["features_computed"] == 24 and len(kept_records(runs)) == 24
        assert all(c["estimate"]["accuracy"] == 1.0 for c in overview["classes"]), overview
        job = wait_job(server.url, httpx.post(server.url + "/teach/train").json()["id"])
        assert job["state"] == "done", job
        assert httpx.get(server.url + "/model").json()["architecture"] == "hand-landmarks"
        r = httpx.post(server.url + "/predict", files=[("files", ("x.jpg", next(data.rglob("*.jpg")).read_bytes()))])
        assert r.status_code == 200 and r.json()[0]["hand"]["found"], r.text
    finally:
        stop(server)
    server = teach()  # a restart finds no hand again
    try:
        assert wait_featurised(server.url, 24)["warm"]["features_computed"] == 0
    finally:
        stop(server)
