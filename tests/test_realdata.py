"""Second tier: the README's figures on the real Rock-Paper-Scissors images.

Runs when $FOLDERCNN_RPS_DIR (train/, test/, validation/) and $FOLDERCNN_RPS_PHOTOS_DIR (real photos of hands)
point at the data; `.ci/run` sets both. A variable that is set but points at something unusable is a failure,
not a skip, so CI cannot go green without the data it was told to use.
"""
import json
import os
from pathlib import Path

import pytest

from testkit import run_cli

pytestmark = pytest.mark.realdata


def data_dir(variable, must_have):
    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"set {variable} to run the real-data tier")
    path = Path(value)
    missing = [m for m in must_have if not (path / m).is_dir()]
    if missing:
        pytest.fail(f"{variable}={value} is set but lacks {', '.join(missing)}: fix or unset it")
    return path


@pytest.fixture(scope="module")
def rps():
    return data_dir("FOLDERCNN_RPS_DIR", ["train", "test"])


@pytest.fixture(scope="module")
def photos():
    return data_dir("FOLDERCNN_RPS_PHOTOS_DIR", ["sxsw", "green-screen"])


@pytest.fixture(scope="module")
def fast_run(rps, tmp_path_factory):
    """The default recipe on all of train/, shortened to 6 of its 12 epochs to keep the suite within its time (the
    full recipe's figure, ~96-98%, is printed by benchmarks/time_to_accuracy.py). Measured: 95.4% on test, 88 s on
    2 cores in fp32."""
    import foldercnn
    foldercnn.runtime.setup()
    return foldercnn.train(rps / "train", tmp_path_factory.mktemp("rps") / "run", epochs=6, seed=0,
                           log=lambda *a: None)


@pytest.fixture(scope="module")
def test_evaluation(fast_run, rps):
    r = run_cli("evaluate", fast_run.model_path, rps / "test", "--out", fast_run.out_dir, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_inspect_real_training_set(rps, cli, tmp_path):
    r = cli("inspect", rps / "train", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 classes, 2520 usable images" in r.stdout
    assert "300x300" in r.stdout and "every file is usable" in r.stdout


@pytest.mark.slow
def test_default_recipe_reaches_the_readme_accuracy_on_test(test_evaluation):
    """README: the fast recipe reaches ~96-98% on the 372 test images; at half its epochs 93% leaves room for
    seed noise."""
    assert test_evaluation["n"] == 372 and test_evaluation["n_skipped"] == 0
    assert test_evaluation["accuracy"] >= 0.93
    lo, hi = test_evaluation["accuracy_ci95"]
    assert lo <= test_evaluation["accuracy"] <= hi and hi - lo < 0.08


@pytest.mark.slow
def test_calibration_improves_ece_on_real_test_images(test_evaluation):
    """README: temperature scaling (fitted on validation only) lowers the test ECE; measured 0.09 -> 0.01-0.03."""
    cal = test_evaluation["calibration"]
    assert cal["calibrated"]["ece"] < cal["uncalibrated"]["ece"]
    assert cal["calibrated"]["ece"] < 0.05
    assert cal["calibrated"]["nll"] < cal["uncalibrated"]["nll"]


@pytest.mark.slow
def test_report_is_completed_with_the_test_section(test_evaluation, fast_run):
    page = (fast_run.out_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6
    assert f"{100 * test_evaluation['accuracy']:.1f}%" in page and "372" in page


@pytest.mark.slow
def test_predicts_the_tutorials_new_photos(fast_run, rps, cli):
    if not (rps / "validation").is_dir():
        pytest.skip("no validation/ folder")
    r = cli("predict", fast_run.model_path, rps / "validation", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 33
    right = sum(Path(row["path"]).parent.name == row["label"] for row in rows)
    assert right >= 30  # CGI hands like the training set's: a good model misses at most a few


@pytest.mark.slow
def test_real_photo_sets_are_evaluated_and_the_gap_is_visible(fast_run, photos):
    """A model trained on CGI hands is measured on real photos: every image read, accuracy reported
    (README: far below the CGI test figure; this is the gap the report must not hide)."""
    import foldercnn
    clf = foldercnn.load(fast_run.model_path)
    for name, count in (("sxsw", 1877), ("green-screen", 2188)):
        ev = foldercnn.evaluate(clf, photos / name)
        assert ev.n == count and not ev.skipped
        assert 0.0 <= ev.accuracy < 0.9


@pytest.mark.slow
def test_short_robust_training_beats_chance_on_real_photos(rps, photos, tmp_path):
    """The robust recipe, shortened (every other CGI training image, one augmented view, 112 px), trained on CGI
    hands only, is clearly better than chance (33%) on both sets of real photos: every figure of the README's
    real-photo table is lower than we want, but this guards what the recipe adds. (Measured with EfficientNet-Lite2:
    48.2% sxsw, 56.9% green-screen; the full recipe's means over 3 seeds are 49.3% and 65.1%.)"""
    import foldercnn
    foldercnn.runtime.setup()
    half = tmp_path / "half"
    for cls in sorted(p for p in (rps / "train").iterdir() if p.is_dir()):
        (half / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[::2]:  # neighbouring renders are near-twins: every other one loses little
            (half / cls.name / f.name).symlink_to(f.resolve())
    result = foldercnn.train(half, tmp_path / "robust", recipe="robust", image_size=112, probe_views=1,
                             seed=0, log=lambda *a: None)
    clf = foldercnn.load(result.model_path)
    accuracy = {name: foldercnn.evaluate(clf, photos / name).accuracy for name in ("sxsw", "green-screen")}
    print(accuracy)
    assert min(accuracy.values()) > 0.42, accuracy
