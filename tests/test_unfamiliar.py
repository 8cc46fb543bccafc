"""The unfamiliarity score: the Gaussians, the threshold (validation only), the model file, and the fields
every interface shows."""

import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import foldercnn
from foldercnn.evaluation.report import evaluate_to_folder
from foldercnn.models import unfamiliar
from foldercnn.models.file import read_header


def gaussians(n, d=8, classes=3, seed=0, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, d, generator=g) * spread
    y = torch.arange(n) % classes
    return means[y] + torch.randn(n, d, generator=g), y, means


@pytest.mark.parametrize("d, rank", [(8, 8), (300, 64)])
def test_far_point_is_unfamiliar_and_a_class_mean_is_not(d, rank):
    x, y, means = gaussians(600, d)
    xv, yv, _ = gaussians(150, d, seed=1)
    xv = xv - gaussians(150, d, seed=1)[2][yv] + means[yv]  # validation from the same class means
    fitted = unfamiliar.fit(x, y, xv, yv)
    assert fitted.rank == rank and fitted.feature_dim == d
    assert 0 < fitted.threshold < float("inf")
    far = means.mean(0, keepdim=True) + 50.0
    u = fitted.unfamiliarity(torch.cat([means, far]))
    assert (u[:3] < 1).all() and u[3] > 1
    # cluster-held-out scores run higher than plain ones: at most ~1% of validation is flagged
    assert float((fitted.unfamiliarity(xv) > 1).float().mean()) <= 0.02


def test_a_refitted_score_carries_the_first_models_held_out_margin():
    """A model refitted on all its images has no held-out features: its threshold is the first model's, as a
    multiple of each model's own training scores (the refitted features here lie in another space, wider)."""
    x, y, means = gaussians(600)
    xv, yv, _ = gaussians(150, seed=1)
    xv = xv - gaussians(150, seed=1)[2][yv] + means[yv]
    first = unfamiliar.fit(x, y, xv, yv)
    other, y2, _ = gaussians(900, d=12, seed=3, spread=2.0)
    refitted = unfamiliar.refitted(first, x, other, y2, num_classes=3)
    own = lambda f, feats: float(torch.quantile(f.score(feats).double(), unfamiliar.QUANTILE))
    assert refitted.feature_dim == 12 and own(refitted, other) != pytest.approx(own(first, x), rel=0.05)
    assert refitted.threshold / own(refitted, other) == pytest.approx(first.threshold / own(first, x), rel=1e-6)
    assert "first model" in refitted.rule
    with pytest.raises(ValueError, match="no usable threshold"):
        unfamiliar.refitted(unfamiliar.Unfamiliarity(first.means, first.basis, first.weights), x, other, y2)


@pytest.mark.parametrize("n", [12, 60, 200])
def test_few_images_give_what_the_full_covariance_gives(n):
    """Fewer images than feature dimensions: the n x n Gram route matches the D x D covariance route."""
    d, rank = 320, 64
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)) * 0.1
    y = torch.zeros(n, dtype=torch.long)
    fast = unfamiliar._Sums(x, y, 1, rank, by_gram=True).fit()[0]
    full = unfamiliar._Sums(x, y, 1, rank, by_gram=False).fit()[0]
    centred = x.double() - x.double().mean(0)
    assert fast.shrinkage == pytest.approx(unfamiliar.ledoit_wolf_shrinkage(centred), rel=1e-9)
    assert fast.shrinkage == pytest.approx(full.shrinkage, rel=1e-9)
    assert fast.inv_rest == pytest.approx(full.inv_rest, rel=1e-6)
    probe = (torch.randn(40, d, generator=g) @ torch.randn(d, d, generator=g)) * 0.1
    torch.testing.assert_close(fast.score(probe), full.score(probe), rtol=1e-4, atol=0)


@pytest.mark.parametrize("by_gram", [True, False])
def test_a_fit_without_some_rows_is_the_fit_of_the_others(by_gram):
    """The threshold's leave-out fits subtract the left-out rows from sums over all rows and follow the whole
    fit's directions a few steps: they score as a fit of a copy of the kept rows does."""
    d, rank = 300, 64
    x, y, _ = gaussians(250 if by_gram else 900, d=d, spread=2.0)
    x = x @ torch.randn(d, d, generator=torch.Generator().manual_seed(1)) * 0.2  # a decaying, unequal spectrum
    drop = torch.arange(0, len(x), 7)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[drop] = False
    sums = unfamiliar._Sums(x, y, 3, rank)
    assert sums.by_gram == by_gram
    left_out = sums.fit(drop, sums.fit()[1])[0]
    alone = unfamiliar._fit_gaussians(x[keep], y[keep], 3, rank)
    torch.testing.assert_close(left_out.means, alone.means)
    assert left_out.shrinkage == pytest.approx(alone.shrinkage, rel=1e-9)
    probe = x[drop] + torch.randn(len(drop), d, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(left_out.score(probe), alone.score(probe), rtol=2e-3, atol=0)


def test_the_chunked_fit_of_a_subset_is_the_fit_of_those_rows(monkeypatch):
    """The fit reads rows a chunk at a time (bounded memory on big folders); a subset by index, as the
    cluster-held-out fits use, gives what fitting a copy of those rows gives."""
    x, y, _ = gaussians(500, d=12)
    idx = torch.arange(0, 500, 2)  # every class keeps rows
    whole = unfamiliar._fit_gaussians(x[idx], y[idx], 3, 12)
    monkeypatch.setattr(unfamiliar, "CHUNK", 7)
    chunked = unfamiliar._fit_gaussians(x, y, 3, 12, idx)
    centred = x[idx].double() - whole.means.double()[y[idx]]
    assert chunked.shrinkage == pytest.approx(
        unfamiliar.ledoit_wolf_shrinkage(centred), rel=1e-6
    )  # means in float32 here
    assert chunked.shrinkage == pytest.approx(whole.shrinkage, rel=1e-9)
    torch.testing.assert_close(chunked.means, whole.means)
    probe = torch.randn(50, 12, generator=torch.Generator().manual_seed(3)) * 4
    torch.testing.assert_close(chunked.score(probe), whole.score(probe), rtol=1e-5, atol=1e-5)


def test_threshold_is_chosen_on_validation_only(trained_model, shapes_dirs, tmp_path):
    """fit sees training and validation features only; evaluating on other folders never touches it."""
    x, y, means = gaussians(300)
    xv, yv, _ = gaussians(90, seed=5)
    xv = xv - gaussians(90, seed=5)[2][yv] + means[yv]
    a, b = unfamiliar.fit(x, y, xv, yv), unfamiliar.fit(x, y, xv, yv)
    assert a.threshold == b.threshold  # deterministic
    assert unfamiliar.fit(x, y, xv * 1.5, yv).threshold != a.threshold  # it does depend on validation
    path = trained_model.model_path
    before = path.read_bytes()
    model = foldercnn.load(path)
    other = tmp_path / "other"
    shutil.copytree(shapes_dirs[1], other)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(other / "circle" / "black.png")
    for folder in (shapes_dirs[1], other):
        foldercnn.evaluate(model, folder)
    assert model.unfamiliarity.threshold == read_header(path)[0]["unfamiliar"]["threshold"]
    assert path.read_bytes() == before


def test_model_file_section_and_one_pass(trained_model, shapes_dirs):
    meta, header = read_header(trained_model.model_path)
    sec = meta["unfamiliar"]
    assert sec["score"] == "mahalanobis" and sec["feature_dim"] == 192 and sec["rank"] == 192
    assert "cluster-held-out" in sec["rule"] and sec["threshold"] > 0
    assert header["unfamiliar.means"]["shape"] == [3, 192] and header["unfamiliar.basis"]["shape"] == [192, 192]
    model = foldercnn.load(trained_model.model_path)
    images = torch.from_numpy(np.stack([model.decode(p) for p in sorted(shapes_dirs[1].rglob("*.png"))[:6]]))
    for tta in (False, True):  # the logits from the features pass are those of the plain pass
        logits, u = model.logits_and_unfamiliarity(images, tta=tta)
        assert torch.allclose(logits, model.logits(images, tta=tta), atol=1e-4) and u.shape == (6,)


def _strip_unfamiliar(src, dst):
    """The same model as an older foldercnn wrote it: no section, no extra tensors."""
    from safetensors.torch import load_file, save_file

    meta, _ = read_header(src)
    del meta["unfamiliar"]
    tensors = {k: v for k, v in load_file(str(src)).items() if not k.startswith("unfamiliar.")}
    save_file(tensors, str(dst), metadata={"foldercnn": json.dumps(meta)})


def test_old_model_files_load_and_give_null(trained_model, shapes_dirs, tmp_path):
    old = tmp_path / "old.safetensors"
    _strip_unfamiliar(trained_model.model_path, old)
    model, new = foldercnn.load(old), foldercnn.load(trained_model.model_path)
    image = next(shapes_dirs[1].rglob("*.png"))
    p = model.predict(image)
    assert p.unfamiliar is None and p.unfamiliarity is None
    d = p.to_dict()
    assert d["unfamiliar"] is None and d["unfamiliarity"] is None
    assert json.loads(json.dumps(d))["unfamiliar"] is None  # null in JSON
    assert p.probabilities == pytest.approx(new.predict(image).probabilities)
    f = foldercnn.evaluate(model, shapes_dirs[1]).to_dict()["flags"]
    assert f["share_unfamiliar"] is None and f["auroc_unfamiliarity"] is None and f["share_uncertain"] is not None


def test_evaluate_flags(trained_model, shapes_dirs, tmp_path):
    ev = foldercnn.evaluate(foldercnn.load(trained_model.model_path), shapes_dirs[1])
    f = ev.to_dict()["flags"]
    assert set(f) >= {
        "share_uncertain",
        "share_unfamiliar",
        "share_either",
        "errors_flagged",
        "selective_accuracy",
        "auroc_unfamiliarity",
        "auroc_low_confidence",
    }
    assert max(f["share_uncertain"], f["share_unfamiliar"]) <= f["share_either"] <= 1
    assert f["errors_flagged"]["either"] <= f["errors"]
    rows = ev.to_dict()["predictions"]
    assert all(isinstance(r["unfamiliarity"], float) and r["unfamiliar"] == (r["unfamiliarity"] > 1) for r in rows)
    from foldercnn.evaluation.metrics import flag_summary

    same = flag_summary([[0.9, 0.1], [0.2, 0.8]], [0, 1], 0.8, [0.5, 2.0])
    assert same["auroc_low_confidence"] is None and same["errors"] == 0  # one outcome only: no AUROC
    assert same["share_unfamiliar"] == 0.5 and same["selective_accuracy"] == 1.0


def test_serve_fields_and_headline(trained_model, shapes_dirs, tmp_path):
    from foldercnn.deploy.serve import create_app
    from testkit import unfamiliar_between

    run = tmp_path / "run"
    run.mkdir()
    # a black and a noise frame (a covered camera, a broken one) against the shapes on white: the copy's threshold
    # lies between the stranger frame's score and the most familiar shape's, so serve must say unfamiliar
    frames = [tmp_path / "black.png", tmp_path / "noise.png"]
    Image.new("RGB", (40, 40), "black").save(frames[0])
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(frames[1])
    shapes = sorted(shapes_dirs[1].rglob("*.png"))
    _, strange, familiar = unfamiliar_between(trained_model.model_path, frames, shapes, run / "model.safetensors")
    with TestClient(create_app(str(run / "model.safetensors"), workers=1)) as client:
        h = client.get("/model").json()["headline"]
        assert h["source"] == "validation" and "optimistic" in h["label"]
        files = [("files", (p.name, p.read_bytes(), "image/png")) for p in (strange, familiar)]
        rows = client.post("/predict", files=files).json()
        assert rows[0]["unfamiliar"] is True and rows[0]["unfamiliarity"] > 1, rows[0]["unfamiliarity"]
        assert rows[1]["unfamiliar"] is False and rows[1]["unfamiliarity"] < 1, rows[1]["unfamiliarity"]
    evaluate_to_folder(run / "model.safetensors", shapes_dirs[1], run)
    with TestClient(create_app(str(run / "model.safetensors"), workers=1)) as client:
        h = client.get("/model").json()["headline"]
        assert h["source"] == "test" and h["n"] == 45 and h["folder"] == str(shapes_dirs[1])
    page = (run / "report.html").read_text()
    assert f"test accuracy on 45 images from {shapes_dirs[1]}" in page
    assert "validation, from the training folder: optimistic" in page and "unfamiliar" in page
