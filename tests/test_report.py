"""evaluate --out, report.html and `foldercnn report`, end to end; the page checked in a real browser."""

import json
import shutil

import pytest
from PIL import Image

import foldercnn
from testkit import run_cli

FIGURES = ("confusion.png", "mistakes.png", "calibration.png")


@pytest.fixture(scope="module")
def evaluated_run(trained_model, shapes_dirs, tmp_path_factory):
    """A copy of the trained run folder, then `foldercnn evaluate MODEL TEST --out RUN --json` on it."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained_model.out_dir, run)
    r = run_cli("evaluate", run / "model.safetensors", shapes_dirs[1], "--out", run, "--json")
    assert r.returncode == 0, r.stderr
    return run, json.loads(r.stdout)


def test_train_writes_a_report_without_test_figures(trained_model):
    page = (trained_model.out_dir / "report.html").read_text()
    for name in ("samples.png", "augmentations.png", "curves.png", "history.csv"):
        assert (trained_model.out_dir / name).is_file(), name
    assert "No test evaluation yet" in page and "foldercnn evaluate" in page
    assert page.count("data:image/png;base64,") == 3  # samples, augmentations, curves
    assert "Calibration" in page and "temperature" in page


def test_evaluate_json_carries_every_number(evaluated_run):
    run, d = evaluated_run
    from foldercnn.evaluation.calibration import wilson_interval

    assert d["n"] == 45 and d["accuracy"] == d["n_correct"] / 45
    assert d["accuracy_ci95"] == pytest.approx(list(wilson_interval(d["n_correct"], 45)))
    assert set(d["per_class"]) == {"circle", "square", "triangle"} and set(d["macro_avg"]) == {
        "precision",
        "recall",
        "f1",
    }
    cal = d["calibration"]
    for part in ("uncalibrated", "calibrated"):
        assert {"ece", "nll", "mean_confidence", "reliability"} <= set(cal[part])
    meta = foldercnn.load(run / "model.safetensors").metadata
    assert cal["temperature"] == meta["calibration"]["temperature"]  # the model's own, not refitted on test
    assert sum(b["count"] for b in cal["calibrated"]["reliability"]) == 45
    assert {"threshold", "count", "errors_flagged", "errors"} <= set(d["uncertain"])
    assert len(d["predictions"]) == 45 and len(d["mistakes"]) == 45 - d["n_correct"]
    f = d["flags"]
    assert {
        "share_unfamiliar",
        "share_uncertain",
        "share_either",
        "errors_flagged",
        "selective_accuracy",
        "auroc_unfamiliarity",
        "auroc_low_confidence",
    } <= set(f)
    assert f["errors_flagged"]["uncertain"] == d["uncertain"]["errors_flagged"]
    assert all("unfamiliarity" in r for r in d["predictions"])
    assert json.loads((run / "evaluation.json").read_text())["accuracy"] == d["accuracy"]


def test_evaluate_out_writes_clear_figures_and_the_full_report(evaluated_run):
    run, d = evaluated_run
    for name in FIGURES:
        w, h = Image.open(run / name).size
        assert w > 300 and h > 100, name
    page = (run / "report.html").read_text()
    assert "No test evaluation yet" not in page and "not found in the run folder" not in page
    assert page.count("data:image/png;base64,") == 6
    assert "Wilson" in page and "expected calibration error" in page and "most confident mistakes" in page
    assert f"{100 * d['accuracy']:.2f}%" in page
    assert "http://" not in page and "https://" not in page  # self-contained: opens offline


def test_evaluate_text_output_and_tta(trained_model, shapes_dirs, cli):
    r = cli("evaluate", trained_model.model_path, shapes_dirs[1], "--tta")
    assert r.returncode == 0, r.stderr
    assert "95% interval" in r.stdout and "calibration: temperature" in r.stdout and "uncertain" in r.stdout


def test_report_command_recreates_the_page(evaluated_run, cli):
    run, _ = evaluated_run
    before = (run / "report.html").read_text()
    (run / "report.html").unlink()
    r = cli("report", run)
    assert r.returncode == 0, r.stderr
    after = (run / "report.html").read_text()
    assert after.count("data:image/png;base64,") == before.count("data:image/png;base64,") == 6


@pytest.mark.slow
def test_report_and_evaluate_errors_are_clear(shapes_dirs, cli, tmp_path, trained_model):
    r = cli("report", tmp_path / "nothing-here")
    assert r.returncode == 2 and "run folder not found" in r.stderr
    r = cli("report", tmp_path)
    assert r.returncode == 2 and "model file not found" in r.stderr and "Traceback" not in r.stderr
    inside = shapes_dirs[1] / "reports"
    r = cli("evaluate", trained_model.model_path, shapes_dirs[1], "--out", inside)
    assert r.returncode == 2 and "never writes into your data" in r.stderr
    assert not inside.exists()


@pytest.mark.browser
def test_report_opens_in_a_browser_with_no_broken_image(evaluated_run, browser, tmp_path):
    run, _ = evaluated_run
    for width, name in ((1100, "report.png"), (390, "report-phone.png")):
        page = browser.new_page(viewport={"width": width, "height": 900})
        errors, failed = [], []
        page.on("console", lambda m, errors=errors: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
        page.on("requestfailed", lambda req, failed=failed: failed.append(req.url))
        page.goto((run / "report.html").as_uri())
        page.wait_for_load_state("load")
        sizes = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(sizes) == 6 and all(done and w > 0 for done, w in sizes), sizes
        assert errors == [] and failed == []
        assert "How good is it" in page.inner_text("body")
        page.screenshot(path=str(tmp_path / name), full_page=True)
        assert Image.open(tmp_path / name).size[0] == width
        page.close()
