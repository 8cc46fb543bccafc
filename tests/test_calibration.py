"""Metrics, calibration and temperature scaling against hand-computed and synthetic cases."""

import math

import numpy as np
import pytest
import torch

from foldercnn.evaluation.calibration import (
    T_MIN,
    choose_temperature,
    expected_calibration_error,
    fit_temperature,
    mean_confidence,
    nll,
    wilson_interval,
)
from foldercnn.evaluation.metrics import evaluation_from_logits, metrics_from_predictions


def test_metrics_by_hand_including_a_class_never_predicted():
    # class 2 ("c") is never predicted: precision 0 by definition, recall 0, no warning or NaN
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 0, 1]
    accuracy, per_class, cm = metrics_from_predictions(y_true, y_pred, ["a", "b", "c"])
    assert accuracy == 0.5
    assert per_class["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert per_class["b"]["precision"] == 0.5 and per_class["b"]["recall"] == 1.0
    assert per_class["b"]["f1"] == pytest.approx(2 / 3)
    assert per_class["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert cm == [[1, 1, 0], [0, 2, 0], [1, 1, 0]]


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_ece_of_a_perfectly_calibrated_case_is_about_zero():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.34, 1.0, 200_000)
    correct = rng.random(conf.size) < conf  # right exactly as often as it claims
    assert expected_calibration_error(conf, correct) < 0.005


def test_ece_of_an_overconfident_case():
    conf = np.full(1000, 0.99)
    correct = np.arange(1000) % 2 == 0  # 50% right while claiming 99%
    assert expected_calibration_error(conf, correct) == pytest.approx(0.49)


def overconfident_logits(n=3000, classes=3, scale=4.0, seed=0):
    """Logits from a calibrated model (T = 1) multiplied by `scale`: over-confident by exactly that factor."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=g).flatten()
    return logits * scale, labels


def test_temperature_recovers_the_overconfidence_factor_and_lowers_nll():
    logits, labels = overconfident_logits()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.1)
    assert nll(logits, labels, t) < nll(logits, labels, 1.0) - 0.1
    probs = torch.softmax(logits / t, 1)
    conf, pred = probs.max(1)
    before = expected_calibration_error(
        torch.softmax(logits, 1).max(1).values.numpy(), (logits.argmax(1) == labels).numpy()
    )
    after = expected_calibration_error(conf.numpy(), (pred == labels).numpy())
    assert after < before / 3


def test_temperature_never_changes_the_predicted_class():
    logits, labels = overconfident_logits(n=500)
    ev1 = evaluation_from_logits(logits, labels, ["a", "b", "c"], temperature=1.0)
    ev2 = evaluation_from_logits(logits, labels, ["a", "b", "c"], temperature=3.0)
    assert [r["predicted"] for r in ev1.rows()] == [r["predicted"] for r in ev2.rows()]
    assert ev1.accuracy == ev2.accuracy
    assert ev2.calibration["calibrated"]["ece"] < ev1.calibration["calibrated"]["ece"]


def test_error_free_validation_does_not_make_the_model_certain():
    # every validation image right: the NLL fit alone would drive T to its lower bound (~100% sure always)
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(300) % 3
    logits = torch.randn(300, 3, generator=g) + 3 * torch.nn.functional.one_hot(labels, 3)
    logits = logits[logits.argmax(1) == labels]
    labels = logits.argmax(1)
    assert fit_temperature(logits, labels) == pytest.approx(T_MIN, rel=0.05)
    t, rule = choose_temperature(logits, labels)
    assert t > 2 * T_MIN and "lower 95% bound" in rule
    lower = wilson_interval(len(labels), len(labels))[0]
    assert mean_confidence(logits, t) == pytest.approx(lower, abs=1e-3)


def test_evaluation_numbers_are_consistent():
    logits, labels = overconfident_logits(n=400, seed=3)
    ev = evaluation_from_logits(
        logits,
        labels.tolist(),
        ["a", "b", "c"],
        temperature=2.0,
        uncertain_below=0.8,
        paths=[f"img{i}.png" for i in range(400)],
    )
    d = ev.to_dict()
    lo, hi = d["accuracy_ci95"]
    assert lo < d["accuracy"] < hi and d["n_correct"] == round(d["accuracy"] * 400)
    mistakes = d["mistakes"]
    assert len(mistakes) == 400 - d["n_correct"]
    assert [m["probability"] for m in mistakes] == sorted((m["probability"] for m in mistakes), reverse=True)
    assert all(m["true"] != m["predicted"] for m in mistakes)
    u = d["uncertain"]
    probs = torch.softmax(logits / 2.0, 1).max(1).values
    assert u["count"] == int((probs < 0.8).sum())
    assert sum(b["count"] for b in d["calibration"]["calibrated"]["reliability"]) == 400
    assert math.isclose(d["calibration"]["temperature"], 2.0)


def test_trained_model_stores_a_temperature_that_lowers_validation_nll(trained_model):
    from foldercnn.models.file import read_metadata

    cal = read_metadata(trained_model.model_path)["calibration"]
    assert cal["val_nll_after"] <= cal["val_nll_before"] + 1e-9
    assert T_MIN < cal["temperature"] < 20 and cal["uncertain_below"] == 0.8
    assert "validation" in cal["fitted_on"]


def test_classifier_uses_the_temperature_and_flags_uncertain_predictions(trained_model, shapes_dirs):
    import foldercnn

    clf = foldercnn.load(trained_model.model_path)
    image = next((shapes_dirs[1] / "circle").glob("*.png"))
    x = torch.from_numpy(clf.decode(image)).unsqueeze(0)
    expected = torch.softmax(clf.logits(x) / clf.temperature, 1)[0]
    pred = clf.predict(image)
    assert pred.probability == pytest.approx(float(expected.max()), abs=1e-6)
    assert pred.uncertain == (pred.probability < clf.uncertain_below)
    clf.uncertain_below = 1.01
    assert clf.predict(image).uncertain is True
    clf.uncertain_below = 0.0
    assert clf.predict(image).uncertain is False
