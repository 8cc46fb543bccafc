"""Training features observed in what they do, not in a flag that echoes an argument: bf16 autocast really
computes in bfloat16, the saved model is the chosen epoch's, flip TTA averages an image with its mirror, and
the temperature is fitted on the validation split only."""

import copy

import pytest
import torch

import foldercnn
from foldercnn.data.folders import load_folder, scan_folder, stratified_split
from foldercnn.evaluation.calibration import choose_temperature
from foldercnn.models.inference import batched_logits
from foldercnn.models.registry import create_model
from foldercnn.training.loop import fit
from foldercnn.training.options import TrainOptions
from foldercnn.training.prepare import prepare_data
from foldercnn.training.recipes import get_recipe
from foldercnn.training.run import RunContext, RunWriter


@pytest.fixture(scope="module")
def tiny_split(shapes_dirs):
    data = load_folder(scan_folder(shapes_dirs[0]), 16)
    train_idx, val_idx = stratified_split(data.labels, 0.3, seed=0)
    return data.subset(train_idx), data.subset(val_idx)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_is_what_the_convolutions_compute_in(tiny_split, precision, dtype):
    train, val = tiny_split
    recipe = get_recipe("fast", epochs=1, image_size=16)
    model = create_model("fast-cnn", 3)
    seen = set()
    model[0][0].register_forward_hook(lambda m, i, o: seen.add((m.training, o.dtype)))
    fit(model, train, val, recipe, RunContext(precision=precision))
    assert (True, dtype) in seen  # training steps ran in the requested precision
    assert (True, torch.bfloat16 if dtype == torch.float32 else torch.float32) not in seen


def test_the_kept_weights_are_the_best_epochs(tiny_split):
    """Noisy validation labels make validation accuracy go up and down; the kept state is the best epoch's
    (ties to the later one), not the last."""
    train, val = tiny_split
    g = torch.Generator().manual_seed(3)
    noisy = copy.copy(val)
    noisy.labels = torch.randint(0, 3, (len(val),), generator=g)
    recipe = get_recipe("fast", epochs=8, image_size=16, lr=0.2)
    torch.manual_seed(0)  # the initial weights must not depend on which tests ran before in this process
    model = create_model("fast-cnn", 3)
    states = []

    class EveryEpoch(RunWriter):  # the writer is told after every epoch: keep that epoch's weights
        def history(self, rows):
            states.append(copy.deepcopy(model.state_dict()))

    result = fit(model, train, noisy, recipe, RunContext(precision="fp32", writer=EveryEpoch()))
    accuracies = [h["val_accuracy"] for h in result.history]
    best = max(range(len(accuracies)), key=lambda i: (accuracies[i], i)) + 1
    assert best != len(accuracies), f"precondition: the last epoch must not be the best here ({accuracies})"
    assert result.best_epoch == best
    for k, v in result.best_state.items():
        assert torch.equal(v, states[best - 1][k]), k


def test_flip_tta_averages_the_image_and_its_mirror(trained_model, shapes_dirs, cli):
    clf = foldercnn.load(trained_model.model_path)
    folder = load_folder(scan_folder(shapes_dirs[1], classes=clf.classes, min_classes=1), clf.image_size)
    x = folder.images
    model = clf.model.eval()
    with torch.no_grad():
        from foldercnn.models.preprocess import preprocess

        plain = model(preprocess(x, clf.mean, clf.std)).float()
        mirrored = model(preprocess(x.flip(2), clf.mean, clf.std)).float()  # NHWC: width is dim 2
    expected = torch.softmax((plain + mirrored) / 2 / clf.temperature, 1)
    assert torch.allclose(clf.logits(x, tta=True), (plain + mirrored) / 2, atol=1e-4)
    ev = foldercnn.evaluate(clf, shapes_dirs[1], tta=True)
    assert torch.allclose(torch.tensor(ev.probabilities), expected, atol=1e-4)
    # the command line's --tta reaches the same numbers
    import json

    r = cli("evaluate", trained_model.model_path, shapes_dirs[1], "--tta", "--json")
    rows = json.loads(r.stdout)["predictions"]
    got = torch.tensor([row["probability"] for row in rows])
    assert torch.allclose(got, expected.max(1).values, atol=1e-4)
    assert not torch.allclose(expected, torch.softmax(plain / clf.temperature, 1), atol=1e-3)  # TTA mattered


def test_temperature_is_fitted_on_the_validation_split(trained_model, shapes_dirs):
    """Recompute the validation split the job used and the temperature the rule gives on it: the stored one."""
    clf = foldercnn.load(trained_model.model_path)
    recipe = get_recipe("fast", epochs=8, image_size=32)
    _, val, _ = prepare_data(shapes_dirs[0], recipe, TrainOptions(seed=0), events=lambda *a: None)
    logits = batched_logits(clf.model, val.take(slice(None)), clf.mean, clf.std)
    t, rule = choose_temperature(logits, val.labels)
    cal = clf.metadata["calibration"]
    assert cal["temperature"] == pytest.approx(t, rel=1e-6) and cal["rule"] == rule
    assert cal["fitted_on"] == f"validation split ({len(val)} images)"


def test_a_refit_trains_on_the_whole_folder_and_is_calibrated_without_its_held_out_images(shapes_dirs, tmp_path):
    """refit: after the split's fit, every refit epoch sees all 120 images of the folder (batches of 8: 15 steps),
    the split's fit only its training share; the stored temperature and validation NLL are those of the split's
    model (the same run without refit) on the images it never trained on, not of the saved, refitted model."""
    kw = dict(recipe="fast", epochs=3, image_size=32, batch_size=8, seed=0, log=lambda *a: None)
    plain = foldercnn.train(shapes_dirs[0], tmp_path / "plain", **kw)
    refit = foldercnn.train(shapes_dirs[0], tmp_path / "refit", refit=True, **kw)
    n_all = refit.n_train + refit.n_val
    assert n_all == 120 and plain.refit_history == []
    assert [h["images"] for h in refit.refit_history] == [n_all] * plain.best_epoch
    assert all(h["images"] == 8 * -(-refit.n_train // 8) for h in refit.history)
    saved, first = foldercnn.load(refit.model_path), foldercnn.load(plain.model_path)
    assert saved.metadata["refit"]["n_train"] == n_all
    assert saved.metadata["refit"]["images_seen"] == n_all * plain.best_epoch
    cal, first_cal = saved.metadata["calibration"], first.metadata["calibration"]
    assert cal["temperature"] == first_cal["temperature"] and cal["val_nll_before"] == first_cal["val_nll_before"]
    _, val, _ = prepare_data(shapes_dirs[0], get_recipe("fast", image_size=32), TrainOptions(seed=0), lambda *a: None)
    own = batched_logits(saved.model, val.take(slice(None)), saved.mean, saved.std)
    assert float(torch.nn.functional.cross_entropy(own, val.labels)) != pytest.approx(cal["val_nll_before"], rel=1e-3)
    assert "Then refitted: a fresh model trained on all 120 images" in (tmp_path / "refit" / "report.html").read_text()


def test_progressive_resizing_grows_the_training_batches_and_validates_at_full_size(shapes_dirs):
    """start_size 16 -> image_size 48 in 16 px steps by 3/4 of the run: the training batches the network sees
    grow 16, 32, 48 in that order; validation always runs at 48."""
    data = load_folder(scan_folder(shapes_dirs[0]), 48)
    train_idx, val_idx = stratified_split(data.labels, 0.3, seed=0)
    recipe = get_recipe("fast", epochs=4, image_size=48, start_size=16, batch_size=16)
    model = create_model("fast-cnn", 3)
    sides = {True: [], False: []}
    model[0][0].register_forward_hook(lambda m, i, o: sides[m.training].append(i[0].shape[-1]))
    fit(model, data.subset(train_idx), data.subset(val_idx), recipe, RunContext(precision="fp32"))
    grown = sides[True]
    assert grown == sorted(grown) and grown[0] == 16 and grown[-1] == 48 and set(grown) == {16, 32, 48}
    assert set(sides[False]) == {48}


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"recipe": "seed", "start_size": 64}, "start_size needs a model that works at any input size"),
        ({"recipe": "fast", "start_size": 128}, "start_size must not exceed image_size (96), got 128"),
        ({"recipe": "fast", "start_size": 2}, "start_size between"),
    ],
)
def test_a_start_size_that_cannot_work_is_refused(overrides, message):
    with pytest.raises(foldercnn.FolderCNNError) as e:
        get_recipe(overrides.pop("recipe"), **overrides)
    assert message in str(e.value)


def test_the_default_growth_is_dropped_where_it_cannot_apply():
    """fast grows from 48 px; at a smaller --image-size, or with a --model whose layers depend on the input size,
    it trains at one size instead of being refused. An explicit start_size is still checked."""
    assert get_recipe("fast").start_size == 48
    assert get_recipe("fast", image_size=32).start_size == 0
    assert get_recipe("fast", model="tutorial-cnn", image_size=96).start_size == 0
    assert get_recipe("fast", start_size=0).start_size == 0
