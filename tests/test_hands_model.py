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


def test_export_refuses_a_hand_model_with_its_reason(hand_model, cli, tmp_path):
    r = cli("export", hand_model, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "hand" in r.stderr and "no ONNX form" in r.stderr and not (tmp_path / "m.onnx").exists()


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
