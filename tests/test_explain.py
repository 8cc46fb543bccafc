"""Where a model looked: class activation maps for every image architecture, the pointing game on a set where a
small patch decides the class, `predict --explain`, `/predict?explain=1`, and the share of the map on the subject."""

import json

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import foldercnn
from foldercnn.data.images import decode
from foldercnn.data.subjects import subject_masks
from foldercnn.errors import FolderCNNError
from foldercnn.evaluation.looking import map_share
from foldercnn.models.explain import METHODS, explain_batch, to_grid
from foldercnn.models.registry import create_model
from testkit import make_pointing_set, pointing_hits, run_cli, running_server, untrained_hand_model

SIZE = 32  # the pointing set's images; fast-cnn with three widths keeps an 8 x 8 map at this size


@pytest.fixture(scope="module")
def pointing(tmp_path_factory):
    """A fast-cnn trained for a few seconds on images whose class is the pattern of one small red patch."""
    base = tmp_path_factory.mktemp("pointing")
    make_pointing_set(base / "train", per_class=100, size=SIZE, seed=0)
    test, boxes = make_pointing_set(base / "test", per_class=20, size=SIZE, seed=1)
    result = foldercnn.train(
        base / "train",
        base / "run",
        recipe="fast",
        epochs=10,
        image_size=SIZE,
        model_args={"widths": [16, 32, 64]},
        seed=0,
        log=lambda *a: None,
    )
    paths = sorted(boxes)
    images = np.stack([decode(test / p, SIZE) for p in paths])
    return foldercnn.load(result.model_path), images, [boxes[p] for p in paths], paths, test


def test_the_map_points_at_the_patch_that_decides_the_class(pointing):
    classifier, images, boxes, paths, _ = pointing
    predictions, maps = classifier.explain_arrays(images)
    accuracy = np.mean([p.label == path.split("/")[0] for p, path in zip(predictions, paths)])
    assert accuracy >= 0.9, accuracy  # it learned the patch
    hits = pointing_hits(maps, boxes, SIZE, tolerance=2)
    assert hits.mean() >= 0.9, hits.mean()
    # the same maps moved to another place do not point: the hits are about where the patch is
    assert pointing_hits(np.roll(maps, 4, axis=2), boxes, SIZE, tolerance=2).mean() < 0.6


def test_explained_predictions_are_the_plain_ones(pointing):
    classifier, images, *_ = pointing
    plain = classifier.predict_arrays(images)
    explained, _ = classifier.explain_arrays(images)
    assert [p.label for p in explained] == [p.label for p in plain]
    np.testing.assert_allclose([p.probability for p in explained], [p.probability for p in plain], atol=1e-5)
    np.testing.assert_allclose([p.unfamiliarity for p in explained], [p.unfamiliarity for p in plain], atol=1e-4)


def test_a_mirrored_image_gets_the_mirrored_map(pointing):
    classifier, images, *_ = pointing
    classifier.tta = True  # with flip averaging the map of the mirror image is exactly the mirrored map
    try:
        _, maps = classifier.explain_arrays(images[:12])
        _, mirrored = classifier.explain_arrays(np.ascontiguousarray(images[:12, :, ::-1]))
    finally:
        classifier.tta = False
    np.testing.assert_allclose(mirrored, maps[:, :, ::-1], atol=1e-5)
    assert not np.allclose(maps, maps[:, :, ::-1], atol=1e-2)  # the maps are not symmetric themselves


@pytest.mark.parametrize(
    "name, size, args, side",
    [
        ("fast-cnn", 64, {}, 8),
        ("tutorial-cnn", 150, {"image_size": 150}, 15),
        ("effnet-lite0", 224, {}, 7),
        ("effnet-lite1", 96, {}, 3),
        ("effnet-lite2", 160, {}, 5),
    ],
)
@pytest.mark.parametrize("method", METHODS)
def test_maps_of_every_image_architecture_are_finite_in_0_1_and_the_last_convolutions_shape(
    name, size, args, side, method
):
    torch.manual_seed(0)
    model = create_model(name, 3, **args).eval()
    x = torch.randn(3, 3, size, size)
    explained = explain_batch(model, x, tta=False, method=method)
    assert explained.maps.shape == (3, side, side)
    assert torch.isfinite(explained.maps).all()
    assert explained.maps.min() >= 0 and explained.maps.max() <= 1
    assert torch.allclose(explained.maps.flatten(1).amax(1), torch.ones(3))  # each map's peak is 1
    with torch.no_grad():
        torch.testing.assert_close(explained.logits, model(x), atol=1e-4, rtol=1e-4)
    grid = to_grid(explained.maps[0])
    assert len(grid) == 16 and all(len(row) == 16 and all(0 <= v <= 1 for v in row) for row in grid)


def test_a_hands_models_explanation_is_its_skeleton(tmp_path):
    classifier = foldercnn.load(untrained_hand_model(tmp_path / "hands.safetensors"))
    assert classifier.explains == "skeleton"
    blank = np.full((1, 256, 256, 3), 200, np.uint8)  # no hand in it
    predictions, maps = classifier.explain_arrays(blank)
    assert maps is None and predictions[0].label is None


# --- predict --explain ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_explain_writes_one_readable_picture_per_image(pointing, tmp_path):
    classifier, _, _, paths, test = pointing
    out = tmp_path / "explained"
    named = [test / p for p in paths[:2]] + [test / "cross"]
    proc = run_cli("predict", classifier.path, *named, "--explain", out, "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == len(rows) == 2 + 20
    assert pictures[0].name.endswith(f"-{(test / paths[0]).stem}.png")
    with Image.open(pictures[0]) as im:
        im.load()
        assert im.size == (384, 384)  # the photo's shape, longest side 384
        top_left = np.asarray(im)[5:20, 2:40].mean()
    assert top_left < 80  # the caption's dark box is in the corner
    assert "wrote 22 pictures" in proc.stderr


@pytest.mark.slow
def test_predict_explain_refuses_a_folder_inside_the_data(pointing):
    classifier, _, _, _, test = pointing
    before = sorted(p.name for p in test.iterdir())
    proc = run_cli("predict", classifier.path, test / "ring", "--explain", test / "ring" / "maps")
    assert proc.returncode == 2
    assert "inside the data folder" in proc.stderr and "--explain" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (test / "ring" / "maps").exists() and sorted(p.name for p in test.iterdir()) == before


@pytest.mark.slow
def test_an_onnx_model_says_it_has_no_maps(pointing, tmp_path):
    classifier, *_ = pointing
    onnx = tmp_path / "model.onnx"
    assert run_cli("export", classifier.path, "--out", onnx).returncode == 0
    with pytest.raises(FolderCNNError, match="carries no explanations"):
        foldercnn.load(onnx).explain_arrays(np.zeros((1, SIZE, SIZE, 3), np.uint8))


# --- the API ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_api_adds_a_16_by_16_map_only_when_asked(pointing, tmp_path):
    classifier, _, boxes, paths, test = pointing
    files = [("files", (p, (test / p).read_bytes(), "image/png")) for p in paths[:3]]
    with running_server(classifier.path, log=tmp_path / "server.log") as server:
        plain = httpx.post(server.url + "/predict", files=files, timeout=30).json()
        rows = httpx.post(server.url + "/predict?explain=1", files=files, timeout=30).json()
        bad = httpx.post(server.url + "/predict?explain=maybe", files=files, timeout=30)
        described = httpx.get(server.url + "/model", timeout=30).json()
    assert "explanation" not in plain[0]
    assert [r["label"] for r in rows] == [r["label"] for r in plain]
    for row, box in zip(rows, boxes[:3]):
        e = row["explanation"]
        assert e["kind"] == "map" and e["method"] == "grad-cam"
        grid = np.array(e["grid"])
        assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() <= 1
        y, x = np.unravel_index(grid.argmax(), grid.shape)  # the grid's peak is on the deciding patch
        scale = SIZE / 16
        assert box[0] - 3 <= x * scale <= box[2] + 3 and box[1] - 3 <= y * scale <= box[3] + 3
    assert bad.status_code == 400 and "explain must be 0 or 1" in bad.json()["detail"]
    assert described["explains"] == "map"


# --- does it look at the subject? ---------------------------------------------------------------------------


def subject_image(background, size=64):
    """A plain background with a skin-coloured square subject over rows and columns 16-47 (a quarter of it)."""
    a = np.empty((size, size, 3), np.uint8)
    a[:] = background
    a[16:48, 16:48] = (205, 150, 120)
    return a


@pytest.mark.parametrize(
    "background, how", [((250, 250, 250), "auto"), ((40, 170, 60), "auto"), ((40, 170, 60), "green")]
)
def test_the_subject_mask_of_a_plain_or_green_background_is_the_subject(background, how):
    masks, found = subject_masks(subject_image(background)[None], how)
    assert found.all()
    truth = np.zeros((64, 64), bool)
    truth[16:48, 16:48] = True
    assert masks[0][truth].mean() > 0.9 and masks[0][~truth].mean() < 0.1


def test_a_busy_background_gets_no_mask_and_green_needs_a_screen():
    noise = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    assert not subject_masks(noise, "auto")[1].any()
    assert not subject_masks(subject_image((250, 250, 250))[None], "green")[1].any()


def test_the_share_of_a_map_on_the_subject():
    masks = np.zeros((3, 64, 64), np.float32)
    masks[:, 16:48, 16:48] = 1
    inside, outside, even = np.zeros((3, 8, 8), np.float32)
    inside[2:6, 2:6], outside[0, 0] = 1, 1
    even[:] = 1
    share = map_share(np.stack([inside, outside, even]), masks)
    assert share[0] > 0.85 and share[1] < 0.05
    assert share[2] == pytest.approx(0.25, abs=0.01)  # an even map gets the subject's area


def test_evaluate_reports_where_it_looked_on_plain_backgrounds(pointing, tmp_path):
    classifier, *_ = pointing
    for kind in ("cross", "ring", "bars"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        Image.fromarray(subject_image((250, 250, 250))).save(tmp_path / "data" / kind / "a.png")
    ev = foldercnn.evaluate(classifier, tmp_path / "data")
    looking = ev.to_dict()["looking"]
    assert looking["n"] == 3 and looking["measured"] == "map mass"
    assert looking["subject_area"] == pytest.approx(0.25, abs=0.05)
    assert 0 <= looking["share"] <= 1
    assert "looking" not in foldercnn.evaluate(classifier, tmp_path / "data", subject_mask="off").to_dict()


@pytest.mark.slow
def test_predict_explain_replaces_its_own_pictures_and_refuses_a_folder_of_other_files(pointing, tmp_path):
    classifier, _, _, paths, test = pointing
    out = tmp_path / "explained"
    assert run_cli("predict", classifier.path, test / "ring", "--explain", out).returncode == 0
    assert len(list(out.glob("*.png"))) == 20
    again = run_cli("predict", classifier.path, test / paths[0], "--explain", out)  # one image: the rest go
    assert again.returncode == 0, again.stderr
    assert [p.name for p in out.glob("*.png")] == [f"0001-{(test / paths[0]).stem}.png"]
    mine = tmp_path / "holiday"
    mine.mkdir()
    (mine / "0001-beach.png").write_bytes(b"the user's own picture")
    refused = run_cli("predict", classifier.path, test / "ring", "--explain", mine)
    assert refused.returncode == 2 and "did not write there (0001-beach.png)" in refused.stderr
    assert (mine / "0001-beach.png").read_bytes() == b"the user's own picture"
    assert sorted(p.name for p in mine.iterdir()) == ["0001-beach.png"]


def test_the_report_shows_where_it_looked_beside_the_accuracy(pointing, tmp_path):
    from foldercnn.evaluation.report import evaluate_to_folder

    classifier, *_ = pointing
    for kind in ("cross", "ring", "bars"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        Image.fromarray(subject_image((250, 250, 250))).save(tmp_path / "data" / kind / "a.png")
    evs, report = evaluate_to_folder(classifier.path, tmp_path / "data", tmp_path / "run")
    html = report.read_text()
    share = f"{evs[0].looking['share']:.1%}"
    assert "of where it looked was on the subject" in html and share in html
    assert "Does it look at the subject?" in html
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["looking"]["n"] == 3


def test_a_hands_skeleton_is_drawn_where_the_hand_is_on_a_photo_of_another_shape():
    from foldercnn.evaluation.overlays import unletterbox

    # a 300 x 200 photo sits in a 300 x 300 square with 50 px above and below: the photo's top edge is at 1/6
    square = np.array([[0.5, 0.5], [0.0, 50 / 300], [1.0, 250 / 300], [0.25, 0.5]])
    np.testing.assert_allclose(unletterbox(square, 300, 200), [[0.5, 0.5], [0.0, 0.0], [1.0, 1.0], [0.25, 0.5]])
    # and a tall photo: the padding is left and right
    np.testing.assert_allclose(unletterbox([[50 / 300, 0.0]], 200, 300), [[0.0, 0.0]])
