"""The hand finder's pieces around MediaPipe's two models (data/hand_finder.py): the crop, the anchors, the
suppression, the hand box, the projection back; the shipped ONNX files and their NOTICE; the cascade's last stage
on a photo without a hand. benchmarks/hands.py --against-mediapipe measures the whole against MediaPipe."""

import math

import numpy as np
import pytest

from foldercnn.data import hand_finder as hf
from foldercnn.data import hands


def test_a_crop_of_the_whole_image_at_its_own_size_is_the_image():
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    out = hf.warp(rgb, hf.Rect(16, 16, 32, 32), 32, replicate=False)
    np.testing.assert_allclose(out, rgb / 255, atol=1e-6)


def test_a_quarter_turned_crop_is_the_turned_image():
    rgb = np.random.default_rng(1).integers(0, 256, (31, 31, 3), dtype=np.uint8)
    # crop pixel (u, v) samples cx - (v - 15.5), cy + (u - 15.5): with cx = 14.5, cy = 15.5 exactly pixel
    # (x = 30 - v, y = u), which is numpy's counter-clockwise quarter turn
    out = hf.warp(rgb, hf.Rect(14.5, 15.5, 31, 31, math.pi / 2), 31, replicate=True)
    np.testing.assert_allclose(out, np.rot90(rgb, 1) / 255, atol=1e-5)


def test_outside_the_image_the_crop_is_zero_or_the_edge():
    rgb = np.full((8, 8, 3), 200, np.uint8)
    big = hf.Rect(4, 4, 64, 64)
    zero, edge = hf.warp(rgb, big, 16, replicate=False), hf.warp(rgb, big, 16, replicate=True)
    assert zero[0, 0].max() == 0 and np.allclose(edge, 200 / 255)


def test_anchors_are_mediapipes_2016_palm_anchors():
    a = hf.ANCHORS
    assert a.shape == (2016, 2)
    np.testing.assert_allclose(a[0], [0.5 / 24, 0.5 / 24])  # first 24 x 24 grid, two anchors a cell
    np.testing.assert_allclose(a[1], a[0])
    np.testing.assert_allclose(a[1152], [0.5 / 12, 0.5 / 12])  # then the shared 12 x 12 grid, six a cell
    assert (a[1152:1158] == a[1152]).all() and not (a[1158] == a[1152]).all()


def test_weighted_suppression_averages_overlapping_palms_by_score():
    box = np.array([[0.1, 0.1], [0.3, 0.3]] + [[0.2, 0.2]] * 7)
    shifted, far = box + 0.01, box + 0.5
    score = np.array([0.9, 0.6, 0.8])
    out = hf.weighted_nms(score, np.stack([box, shifted, far]))
    assert [round(s, 2) for s, _ in out] == [0.9, 0.8]
    np.testing.assert_allclose(out[0][1], (0.9 * box + 0.6 * shifted) / 1.5)
    np.testing.assert_allclose(out[1][1], far)


def test_decoding_reads_the_boxes_relative_to_their_anchors():
    boxes = np.zeros((1, 2016, 18), np.float32)
    scores = np.full((1, 2016, 1), -50, np.float32)
    scores[0, 5] = 3.0
    boxes[0, 5, :4] = [9.6, 0, 19.2, 38.4]  # x offset 0.05, width 0.1, height 0.2 (of 192 px)
    (score, g), *rest = hf.decode_palms(boxes, scores, 0.5)
    cx, cy = hf.ANCHORS[5]
    assert not rest and score == pytest.approx(1 / (1 + math.exp(-3)))
    np.testing.assert_allclose(g[0], [cx + 0.05 - 0.05, cy - 0.1], atol=1e-6)
    np.testing.assert_allclose(g[1], [cx + 0.05 + 0.05, cy + 0.1], atol=1e-6)
    assert hf.decode_palms(boxes, scores, 0.99) == []


@pytest.mark.parametrize("turn", [0, 1, 2, 3])
def test_the_hand_box_turns_with_the_palm_and_reaches_towards_the_fingers(turn):
    # an upright palm (wrist below the middle knuckle), turned `turn` quarter turns about the image centre
    h = w = 100
    upright = np.array([[0.4, 0.4], [0.6, 0.6], [0.5, 0.6], [0.45, 0.45], [0.5, 0.4]] + [[0.5, 0.5]] * 4)
    c, s = math.cos(turn * math.pi / 2), math.sin(turn * math.pi / 2)
    palm = 0.5 + (upright - 0.5) @ np.array([[c, s], [-s, c]])
    lo, hi = palm[:2].min(0), palm[:2].max(0)
    palm[0], palm[1] = lo, hi
    rect = hf.hand_rect(palm, h, w)
    assert rect.width == pytest.approx(20 * 2.6) and rect.height == rect.width
    expected = (turn * math.pi / 2 + math.pi) % (2 * math.pi) - math.pi
    assert math.isclose(rect.rotation, expected, abs_tol=1e-6) or abs(abs(expected) - math.pi) < 1e-6
    wrist_to_knuckle = (palm[4] - palm[2]) * 100
    towards = np.array([rect.cx - 50, rect.cy - 50])  # the box moved half a palm towards the fingers
    assert towards @ wrist_to_knuckle > 0 and np.linalg.norm(towards) == pytest.approx(10)


def test_landmarks_come_back_in_the_images_coordinates():
    models = hf.Models()
    rgb = np.random.default_rng(2).integers(0, 256, (120, 90, 3), dtype=np.uint8)
    rect = hf.Rect(40, 70, 60, 60, 0.3)
    marks = models.landmarks(rgb, rect)
    assert marks.points.shape == marks.world.shape == (21, 3)
    assert 0 <= marks.presence <= 1 and 0.5 <= marks.handedness <= 1
    # a point the model puts at the crop's centre lands on the rect's centre: check the map on the crop's corners
    x, y = marks.points[:, 0] * 90, marks.points[:, 1] * 120
    assert np.isfinite(x).all() and np.isfinite(y).all()


def test_the_shipped_models_are_mediapipes_with_their_notice_and_licence():
    files = {p.name for p in hf.MODELS_DIR.iterdir()}
    assert {f"{m}.onnx" for m in hands.MODELS} <= files and {"NOTICE", "LICENSE"} <= files
    notice = (hf.MODELS_DIR / "NOTICE").read_text()
    assert "Apache" in notice and "mediapipe" in notice and "make_hand_models.py" in notice
    for m in hands.MODELS:
        assert f"{m}.onnx" in notice


def test_a_photo_without_a_hand_ends_in_the_landmarks_only_stage_and_finds_none():
    from skimage import data

    finder = hands.HandFinder()
    tried = []
    original = finder._try
    finder._try = lambda rgb, stage: tried.append(stage.name) or original(rgb, stage)
    assert finder.find(data.chelsea()) is None
    assert tried == [s.name for s in hands.CASCADE] and hands.CASCADE[-1].landmarks_only


def test_world_points_of_a_turned_image_are_turned_back():
    world = np.array([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0]])
    # found in an image turned once counter-clockwise: +x there is -y here
    np.testing.assert_allclose(hands.turned_back(world, 1), [[0, 1, 0.5], [-2, 0, 0]])
    np.testing.assert_allclose(hands.turned_back(world, 4), world)


def _damaged_records():
    """A seeded corpus of hand-cache entries that the finder never writes: each must read as a miss."""
    from foldercnn.data.hands_cache import RECORD

    good = np.zeros(RECORD, np.float32)
    good[:3] = 0, 1, 0.9
    good[4:] = np.random.default_rng(0).uniform(0.1, 0.9, RECORD - 4)
    corpus = {}
    for name, stage in (("stage past the cascade", len(hands.CASCADE)), ("stage 200", 200), ("stage 1.5", 1.5)):
        r = good.copy()
        r[0] = stage
        corpus[name] = r
    no_hand = np.zeros(RECORD, np.float32)
    no_hand[0], no_hand[10] = -1, 0.5
    corpus["no hand, yet points"] = no_hand
    for name, (i, v) in {
        "score 7": (2, 7.0),
        "right 0.5": (1, 0.5),
        "NaN point": (20, np.nan),
        "huge": (30, 3e38),
    }.items():
        r = good.copy()
        r[i] = v
        corpus[name] = r
    corpus["float64"] = good.astype(np.float64)
    corpus["short"] = good[:-1]
    return corpus


def test_a_damaged_hand_cache_entry_is_a_miss_and_is_found_again(tmp_path):
    from skimage import data

    cache = hands.HandCache(tmp_path / "cache")
    image = np.asarray(data.chelsea()[:256, :256])[None]
    key = hands.image_key(image[0])
    path = cache._path(key)
    path.parent.mkdir(parents=True)
    corpus = {name: r.tobytes() for name, r in _damaged_records().items()}
    for name, r in _damaged_records().items():
        with open(path, "wb") as f:
            np.save(f, r)
        corpus[name] = path.read_bytes()
    header = corpus["float64"][:10] + b"{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000000,), }"
    corpus["a header declaring 10**13 values"] = header.ljust(128, b" ")[:127] + b"\n"
    corpus["not a .npy"], corpus["empty"] = b"garbage" * 10, b""
    for name, raw in corpus.items():
        path.write_bytes(raw)
        assert cache.get(key) is None, name
        found = hands.find_hands(image, cache=cache)  # recomputed, then written over the damaged entry
        assert found.stage[0] == -1 and cache.get(key) is not None, name
