"""Second tier: the real Rock-Paper-Scissors images, when $FOLDERCNN_RPS_DIR points at them."""
import json
import os
from pathlib import Path

import pytest

RPS = os.environ.get("FOLDERCNN_RPS_DIR")
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not RPS or not (Path(RPS) / "train").is_dir(),
                                 reason="set FOLDERCNN_RPS_DIR to the Rock-Paper-Scissors folder (train/, test/)")]


@pytest.fixture(scope="module")
def rps():
    return Path(RPS)


@pytest.fixture(scope="module")
def subset_run(rps, tmp_path_factory):
    """Train the fast recipe briefly on 200 images per class (linked, not copied)."""
    import foldercnn
    base = tmp_path_factory.mktemp("rps")
    for cls in ("paper", "rock", "scissors"):
        (base / "train" / cls).mkdir(parents=True)
        for f in sorted((rps / "train" / cls).iterdir())[::4][:200]:
            (base / "train" / cls / f.name).symlink_to(f.resolve())
    return foldercnn.train(base / "train", base / "run", recipe="fast", epochs=6, seed=0, log=lambda *a: None)


def test_inspect_real_training_set(rps, cli, tmp_path):
    r = cli("inspect", rps / "train", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert "3 classes, 2520 usable images" in r.stdout
    assert "300x300" in r.stdout and "every file is usable" in r.stdout


def test_short_training_on_subset_is_well_above_chance(subset_run, rps, cli):
    r = cli("evaluate", subset_run.model_path, rps / "test", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["n"] == 372
    assert result["accuracy"] > 0.75  # chance is 1/3


def test_predicts_new_photos(subset_run, rps, cli):
    if not (rps / "validation").is_dir():
        pytest.skip("no validation/ folder")
    r = cli("predict", subset_run.model_path, rps / "validation", "--json")
    rows = json.loads(r.stdout)
    assert len(rows) == 33
    right = sum(Path(row["path"]).parent.name == row["label"] for row in rows)
    assert right / len(rows) > 0.6


def test_evaluate_out_completes_the_report_on_real_test_images(subset_run, rps, cli):
    run = subset_run.out_dir
    r = cli("evaluate", subset_run.model_path, rps / "test", "--out", run, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    cal = result["calibration"]
    assert 0 <= cal["calibrated"]["ece"] <= 1 and 0 <= cal["uncalibrated"]["ece"] <= 1
    assert result["accuracy_ci95"][0] < result["accuracy"] < result["accuracy_ci95"][1]
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "372" in page
