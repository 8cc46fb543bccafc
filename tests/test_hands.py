"""The hands recipe's parts that need no MediaPipe: landmark features and their invariances, the cascade's
coordinate mapping, the no-hand answer in predictions and evaluation."""

import numpy as np
import pytest

from foldercnn.data.hands import CASCADE, CascadeStage, FoundHands, transformed
from foldercnn.evaluation.metrics import evaluation_from_logits
from foldercnn.models.landmarks import FEATURES, hand_features
from foldercnn.models.prediction import from_probabilities


def _hands(n=5, seed=0):
    rng = np.random.default_rng(seed)
    world = rng.normal(0, 0.04, (n, 21, 3))
    points = np.concatenate([rng.uniform(0.2, 0.8, (n, 21, 2)), rng.normal(0, 0.05, (n, 21, 1))], -1)
    return points, world


def _rotation_3d(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))  # a proper rotation


def test_features_have_the_documented_width():
    points, world = _hands()
    assert hand_features(points, world).shape == (5, FEATURES)


@pytest.mark.parametrize("mirror", [False, True])
def test_features_ignore_place_size_rotation_and_side(mirror):
    rng = np.random.default_rng(1)
    points, world = _hands()
    f = hand_features(points, world)
    angle = rng.uniform(0, 2 * np.pi)
    r2 = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points.copy()
    moved[..., :2] = (points[..., :2] - 0.5) @ r2.T * 0.6 + [0.3, 0.6]
    world2 = world @ _rotation_3d(rng).T * 1.7 + rng.normal(size=3)
    if mirror:  # the other hand (or the same hand seen from the back): a mirror image
        moved[..., 0] *= -1
        world2[..., 0] *= -1
    np.testing.assert_allclose(hand_features(moved, world2), f, atol=1e-4)


def test_features_change_with_the_gesture():
    points, world = _hands()
    bent = world.copy()
    bent[:, 8] = bent[:, 0]  # the index fingertip folded onto the wrist
    assert np.abs(hand_features(points, bent) - hand_features(points, world)).max() > 0.1


@pytest.mark.parametrize("stage", list(CASCADE) + [CascadeStage("both", 0.3, border=0.2, turns=3)])
def test_cascade_points_map_back_to_the_original_image(stage):
    """A marked pixel found in the transformed image lands where it is in the original."""
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[10, 45] = 255
    image, back = transformed(rgb, stage)
    y, x = np.argwhere(image[..., 0] == 255)[0]
    h, w = image.shape[:2]
    xy = back(np.array([[(x + 0.5) / w, (y + 0.5) / h]]))[0]
    assert xy[0] * 60 == pytest.approx(45.5, abs=1e-6) and xy[1] * 40 == pytest.approx(10.5, abs=1e-6)


def test_a_prediction_without_a_hand_is_no_answer():
    p = from_probabilities(["paper", "rock", "scissors"], [0.1, 0.8, 0.1], 0.8, unfamiliarity=0.5)
    p.set_hand(None)
    d = p.to_dict()
    assert (d["label"], d["hand"], d["uncertain"], d["unfamiliar"]) == (None, None, True, True)
    assert not p.answered and max(d["probabilities"].values()) == 0


def test_a_found_hand_travels_with_the_prediction():
    found = FoundHands.empty(1)
    found.points[0] = np.linspace(0, 1, 63).reshape(21, 3)
    found.stage[0] = 1
    p = from_probabilities(["paper", "rock"], [0.9, 0.1], 0.8)
    p.set_hand(found.hand(0))
    hand = p.to_dict()["hand"]
    assert p.answered and p.label == "paper"
    assert hand["found"] and len(hand["points"]) == 21 and hand["stage"] == CASCADE[1].name


def test_evaluation_counts_no_hand_as_wrong_and_reports_coverage():
    logits = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0], [0.0, 0.0]])
    ev = evaluation_from_logits(
        logits,
        [0, 1, 1, 0],
        ["a", "b"],
        answered=[True, True, True, False],
        unfamiliarity=[0.1, 0.1, 0.1, 0.0],
        paths=list("wxyz"),
    )
    assert ev.accuracy == 0.5  # 2 right of 4: the fourth (class 0, all-zero logits) is not a lucky guess
    assert ev.hands == {"n_found": 3, "coverage": 0.75, "accuracy_where_found": pytest.approx(2 / 3)}
    assert ev.flags["errors"] == 2 and ev.flags["share_unfamiliar"] == 0.25
    assert ev.rows()[3]["predicted"] is None and ev.to_dict()["hands"]["n_found"] == 3
