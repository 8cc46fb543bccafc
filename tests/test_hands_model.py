"""A hand-landmark model end to end without real hands: a model file made from the registry's LandmarkNet,
the hand finder really running on a photo without a hand, every surface saying "no hand found"."""

import json

import numpy as np
import pytest
from PIL import Image

import foldercnn
from foldercnn.data import hands
from testkit import untrained_hand_model

pytestmark = pytest.mark.skipif(not hands.available(), reason="onnxruntime is not installed (foldercnn[hands])")


@pytest.fixture(scope="module")
def hand_model(tmp_path_factory):
    return untrained_hand_model(tmp_path_factory.mktemp("hands") / "model.safetensors")


@pytest.fixture(scope="module")
def cat_photo(tmp_path_factory):
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "cat.jpg"
    Image.fromarray(data.chelsea()).save(path)
    return path


def test_the_model_file_records_the_letterbox_and_loads(hand_model):
    clf = foldercnn.load(hand_model)
    assert clf.image_size == 256 and getattr(clf.image_size, "mode", None) == "letterbox"


def test_a_photo_without_a_hand_gets_no_answer(hand_model, cat_photo, cli):
    r = cli("predict", hand_model, cat_photo, "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["hand"] is None and row["label"] is None and row["unfamiliar"] is True
    text = cli("predict", hand_model, cat_photo)
    assert "no hand found" in text.stdout and "%" not in text.stdout


def test_the_cascade_tries_every_stage_on_a_photo_without_a_hand(cat_photo):
    finder = hands.HandFinder()
    tried = []
    original = finder._try
    finder._try = lambda rgb, stage: tried.append(stage.name) or original(rgb, stage)
    assert finder.find(np.asarray(Image.open(cat_photo))) is None
    assert tried == [s.name for s in hands.CASCADE]
    finder.close()


def test_hands_are_cached_by_content(tmp_path, cat_photo):
    image = np.asarray(Image.open(cat_photo).resize((256, 256)))[None]
    cache = hands.HandCache(tmp_path / "cache")
    first = hands.find_hands(image, cache=cache)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1
    counted = []
    hands.shared_finder().find, original = (lambda rgb: counted.append(1)), hands.shared_finder().find
    try:
        again = hands.find_hands(image.copy(), cache=cache)  # same pixels, another array: read from the cache
    finally:
        hands.shared_finder().find = original
    assert counted == [] and (again.stage == first.stage).all()


def test_export_writes_the_head_and_the_finder_and_answers_like_the_model_file(hand_model, cli, tmp_path, cat_photo):
    import onnxruntime as ort
    import torch

    from foldercnn.models.hand_features import FEATURES

    out = tmp_path / "m.onnx"
    r = cli("export", hand_model, "--out", out)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in tmp_path.iterdir()} >= {f"m.{name}.onnx" for name in hands.MODELS} | {"m.onnx"}
    # the head's graph on the same features as the PyTorch model: the same calibrated probabilities
    clf = foldercnn.load(hand_model)
    x = np.random.default_rng(0).normal(size=(64, FEATURES)).astype(np.float32)
    with torch.no_grad():
        want = torch.softmax(clf.model(torch.from_numpy(x)) / clf.temperature, 1).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(["probabilities"], {"features": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the whole path, torch-free: a photo without a hand is "no hand found" from either file
    answers = [json.loads(cli("predict", m, cat_photo, "--json").stdout)[0] for m in (hand_model, out)]
    assert answers[0]["hand"] is None and answers[1]["hand"] is None and answers[1]["label"] is None


def test_an_exported_hands_model_of_another_finder_is_refused(hand_model, cli, tmp_path, cat_photo):
    import onnx

    out = tmp_path / "m.onnx"
    assert cli("export", hand_model, "--out", out).returncode == 0
    proto = onnx.load(out)
    for prop in proto.metadata_props:
        if prop.key == "preprocessing":
            pre = json.loads(prop.value)
            pre["hands"]["version"] = hands.CACHE_VERSION - 1
            prop.value = json.dumps(pre)
    onnx.save(proto, out)
    r = cli("predict", out, cat_photo)
    assert r.returncode == 2 and "another hand finder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda pre: pre.update(fit="squash"), "needs preprocessing fit 'letterbox'"),
        (lambda pre: pre.pop("hands"), "needs preprocessing.hands"),
        (lambda pre: pre["hands"].update(version=hands.CACHE_VERSION + 1), "another hand finder"),
    ],
)
def test_a_hand_model_file_must_say_how_its_hands_were_found(hand_model, tmp_path, cli, change, message):
    from test_model_file import _with_meta

    path = tmp_path / "m.safetensors"
    path.write_bytes(_with_meta(hand_model.read_bytes(), lambda m: change(m["preprocessing"])))
    r = cli("predict", path, hand_model)  # any image path: the model file is refused first
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
