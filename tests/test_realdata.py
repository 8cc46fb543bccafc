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
    """The default recipe on all of train/, shortened to keep the suite within its time: 6 of its 12 epochs, growing
    from 48 to 64 of its 96 px (the full recipe's figure is printed by benchmarks/time_to_accuracy.py). Measured:
    98.1% on test, 63 s on 2 cores in fp32."""
    import foldercnn

    foldercnn.runtime.setup()
    out = tmp_path_factory.mktemp("rps") / "run"
    return foldercnn.train(rps / "train", out, epochs=6, image_size=64, seed=0, log=lambda *a: None)


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
    """README: the fast recipe reaches ~99% on the 372 test images; shortened (fast_run), 93% leaves room for seed
    noise."""
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
    result = foldercnn.train(
        half, tmp_path / "robust", recipe="robust", image_size=112, probe_views=1, seed=0, log=lambda *a: None
    )
    clf = foldercnn.load(result.model_path)
    accuracy = {name: foldercnn.evaluate(clf, photos / name).accuracy for name in ("sxsw", "green-screen")}
    print(accuracy)
    assert min(accuracy.values()) > 0.42, accuracy


def _every(src, dst, step):
    """A symlink folder with every `step`-th image of each class of SRC (neighbouring images are near-twins)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[::step]:
            (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


@pytest.mark.slow
def test_hands_recipe_trained_on_cgi_is_right_on_real_photos(rps, photos, tmp_path):
    """The hands recipe on every third CGI training image, measured on every fifth real photo (within the suite's
    time). Measured on all of both sets with all of rps/train: green-screen 99.0% (a hand found in 99.3%), sxsw
    65.1% (found in 77.8%, right on 83.6% of those); a photo without a hand found counts as wrong."""
    import foldercnn
    from foldercnn.data import hands

    if not hands.available():
        pytest.fail("the real-data tier needs the hand finder's onnxruntime (pip install -e '.[test]' installs it)")
    foldercnn.runtime.setup()
    result = foldercnn.train(
        _every(rps / "train", tmp_path / "third", 3), tmp_path / "hands", recipe="hands", seed=0, log=lambda *a: None
    )
    clf = foldercnn.load(result.model_path)
    got = {
        name: foldercnn.evaluate(clf, _every(photos / name, tmp_path / name, 5)) for name in ("green-screen", "sxsw")
    }
    print({name: (ev.accuracy, ev.hands) for name, ev in got.items()})
    # exported, it answers as the model file does (torch-free: the finder and the head on onnxruntime)
    from foldercnn.deploy.export import export_model

    onnx_path = export_model(result.model_path, tmp_path / "hands.onnx", log=lambda *a: None)[0]
    photos_sample = sorted(p for p in _every(photos / "sxsw", tmp_path / "sxsw-export", 15).rglob("*") if p.is_file())
    a, b = clf.predict_many(photos_sample), foldercnn.load(onnx_path).predict_many(photos_sample)
    assert [p.label for p in a] == [p.label for p in b]
    assert max(abs(p.probability - q.probability) for p, q in zip(a, b)) < 1e-4
    assert got["green-screen"].accuracy > 0.95 and got["green-screen"].hands["coverage"] > 0.95
    assert got["sxsw"].hands["coverage"] > 0.65 and got["sxsw"].hands["accuracy_where_found"] > 0.8
    assert got["sxsw"].accuracy > 0.55


@pytest.mark.slow
def test_the_cascade_finds_the_hands_of_the_tutorials_new_photos(rps):
    """rps/validation: 33 photos, 2 per class at 900 x 900. At least 31 hands found (measured: 32; one 900 px rock
    is missed), every point inside the picture."""
    import numpy as np

    from foldercnn.data import hands
    from foldercnn.data.folders import load_folder, scan_folder
    from foldercnn.data.images import Letterbox

    data = load_folder(scan_folder(rps / "validation"), Letterbox(256))
    found = hands.find_hands(data.images.numpy())
    assert found.found.sum() >= 31, [p for p, f in zip(data.paths, found.found) if not f]
    xy = found.points[found.found][..., :2]
    assert (xy > -0.05).all() and (xy < 1.05).all()
    assert set(np.unique(found.stage[found.found])) <= set(range(len(hands.CASCADE)))


@pytest.mark.slow
def test_teach_with_the_hands_recipe_through_the_api(photos, tmp_path):
    """`foldercnn teach` with --teach-recipe hands: 10 green-screen photos per class posted in two bursts, Train,
    and the served model answers with the hand it found (or says none was found) for photos it never saw."""
    import httpx

    from foldercnn.data import hands
    from test_teach import start_teach_server, stop, wait_job

    if not hands.available():
        pytest.fail("the real-data tier needs the hand finder's onnxruntime (pip install -e '.[test]' installs it)")
    server = start_teach_server(
        "teach",
        tmp_path / "mine",
        "--teach-runs",
        tmp_path / "runs",
        "--teach-recipe",
        "hands",
        log=tmp_path / "teach.log",
    )
    try:
        url, held_out = server.url, []
        for cls in ("paper", "rock", "scissors"):
            shots = sorted((photos / "green-screen" / cls).iterdir())
            assert httpx.post(url + "/teach/classes", json={"name": cls}).status_code == 201
            for burst, part in (("a", shots[:5]), ("b", shots[300:305])):
                r = httpx.post(
                    f"{url}/teach/classes/{cls}/images?burst={burst}",
                    files=[("files", (p.name, p.read_bytes(), "image/jpeg")) for p in part],
                )
                assert r.status_code == 201, r.text
            held_out += [(cls, p) for p in shots[600:603]]
        r = httpx.post(url + "/teach/train", headers={"Origin": url})
        assert r.status_code == 202, r.text
        done = wait_job(url, r.json()["id"], timeout=600)
        assert done["state"] == "done", done
        answers = [
            (
                cls,
                httpx.post(
                    url + "/predict", files=[("files", (p.name, p.read_bytes(), "image/jpeg"))], timeout=60
                ).json()[0],
            )
            for cls, p in held_out
        ]
        assert all("hand" in a for _, a in answers)
        right = sum(a["label"] == cls for cls, a in answers)
        assert right >= 7, answers  # of 9
        found = [a for _, a in answers if a["hand"] is not None]
        assert found and all(len(a["hand"]["points"]) == 21 for a in found)
    finally:
        stop(server)
