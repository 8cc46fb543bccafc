"""`foldercnn evaluate MODEL TEST OTHER...`: one row per folder, and the report's "other photos" table."""

import json
import shutil

import pytest
from PIL import Image

from foldercnn import run_folder as rf
from foldercnn.evaluation.report import evaluate_to_folder
from testkit import make_shapes, run_cli


@pytest.mark.slow
def test_several_folders_give_one_row_each_and_a_report_table(trained_model, shapes_dirs, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_model.model_path, run / rf.MODEL)
    # "other photos": the same shapes drawn bigger and darker, inverted, as another camera might see them
    other = make_shapes(tmp_path / "other", per_class=6, size=80, seed=5)
    for p in other.rglob("*.png"):
        Image.eval(Image.open(p), lambda v: 255 - v).save(p)
    r = run_cli("evaluate", run / rf.MODEL, shapes_dirs[1], other, "--out", run)
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("one row per folder")[1].splitlines()
    assert table[1].split()[:2] == ["folder", "images"]
    assert table[2].startswith(str(shapes_dirs[1])) and table[3].startswith(str(other))
    assert table[3].split()[1] == "18"
    rows = json.loads((run / rf.OTHER_FOLDERS).read_text())
    assert [r_["data_dir"] for r_ in rows] == [str(other)] and rows[0]["n"] == 18
    assert json.loads((run / rf.EVALUATION).read_text())["data_dir"] == str(shapes_dirs[1])  # the test folder
    page = (run / rf.REPORT).read_text()
    assert "How it does on other photos" in page and str(other) in page

    js = run_cli("evaluate", run / rf.MODEL, shapes_dirs[1], other, "--json")
    assert [e["n"] for e in json.loads(js.stdout)] == [45, 18]

    # evaluated again on the test folder alone: the old rows go, they were not measured with this evaluation
    evs, _ = evaluate_to_folder(run / rf.MODEL, shapes_dirs[1], run)
    assert len(evs) == 1 and not (run / rf.OTHER_FOLDERS).exists()
    assert "How it does on other photos" not in (run / rf.REPORT).read_text()


def test_a_missing_folder_among_several_is_a_clear_error(trained_model, shapes_dirs, tmp_path):
    r = run_cli("evaluate", trained_model.model_path, shapes_dirs[1], tmp_path / "nope")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope" in r.stderr
