"""EfficientNet-Lite0/1/2: the packaged ImageNet weights and our preprocessing classify real photos correctly."""

import pytest
import torch

from foldercnn.data.images import decode
from foldercnn.models.effnet import INPUT_MEAN, INPUT_STD, VARIANTS
from foldercnn.models.preprocess import preprocess
from foldercnn.models.registry import create_model
from foldercnn.models.summary import count_parameters


@pytest.fixture(scope="module")
def skimage_data():
    """scikit-image's sample photos (a test dependency); only the tests that use them skip without it."""
    return pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def imagenet_model():
    return create_model("effnet-lite0", num_classes=1000, pretrained=True).eval()


def top5(model, image, size=224):
    x = preprocess(torch.from_numpy(decode(image, size)).unsqueeze(0), INPUT_MEAN, INPUT_STD)
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)[0]
    return probs.topk(5).indices.tolist(), probs


def test_cat_photo_is_a_cat(imagenet_model, skimage_data):
    top, probs = top5(imagenet_model, skimage_data.chelsea())
    assert top[0] in range(281, 286)  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian
    assert probs[281:286].sum() > 0.8


def test_coffee_photo_is_coffee(imagenet_model, skimage_data):
    top, probs = top5(imagenet_model, skimage_data.coffee())
    assert top[0] in (967, 968)  # espresso, cup
    assert probs[967] > 0.5


def test_parameter_count_and_new_head():
    assert count_parameters(create_model("effnet-lite0", num_classes=1000)) == 4_652_008
    model = create_model("effnet-lite0", num_classes=3, pretrained=True)
    assert model.head.out_features == 3
    reference = create_model("effnet-lite0", num_classes=1000, pretrained=True)
    assert torch.equal(model._conv_stem.weight, reference._conv_stem.weight)


@pytest.mark.parametrize("variant, parameters", [("lite1", 5_416_680), ("lite2", 6_092_072)])
def test_the_bigger_lites_load_their_weights_and_see_a_cat_and_coffee(variant, parameters, skimage_data):
    """Lite1 and Lite2 are Lite0 with more and wider blocks (effnet.stages); their packaged weights load with
    every key and shape checked, and at their own input size they see what Lite0 sees."""
    model = create_model(f"effnet-{variant}", num_classes=1000, pretrained=True).eval()
    assert count_parameters(model) == parameters
    size = VARIANTS[variant][2]
    top, probs = top5(model, skimage_data.chelsea(), size)
    assert top[0] in range(281, 286) and probs[281:286].sum() > 0.5
    top, probs = top5(model, skimage_data.coffee(), size)
    assert top[0] in (967, 968)


@pytest.mark.slow
def test_transfer_recipe_round_trip(shapes_dirs, tmp_path):
    """Linear probe (and a short fine-tune) on generated images -> a normal model file that predicts."""
    import foldercnn
    from foldercnn.models.file import read_metadata

    result = foldercnn.train(
        shapes_dirs[0], tmp_path / "probe", recipe="probe", image_size=96, seed=0, log=lambda *a: None
    )
    clf = foldercnn.load(result.model_path)
    assert clf.metadata["architecture"] == "effnet-lite0" and clf.metadata["arch_args"] == {}
    assert foldercnn.evaluate(clf, shapes_dirs[1]).accuracy >= 0.85  # chance is 1/3
    again = foldercnn.load(result.model_path)
    files = sorted(shapes_dirs[1].rglob("*.png"))[:4]
    assert [p.probabilities for p in again.predict_many(files)] == [p.probabilities for p in clf.predict_many(files)]
    lines = []
    tuned = foldercnn.train(
        shapes_dirs[0],
        tmp_path / "tuned",
        recipe="transfer",  # fine-tunes by default
        image_size=96,
        epochs=1,
        seed=0,
        log=lines.append,
    )
    # the probe before a fine-tuning skips the mirrored views; the frozen layers' outputs are kept for later passes
    assert any(f"features: {tuned.n_train} training views" in str(line) for line in lines), lines
    assert any(f"outputs kept for {tuned.n_train} training and {tuned.n_val} validation" in str(line) for line in lines)
    meta = read_metadata(tuned.model_path)
    assert meta["fine_tuned"] is True and meta["fine_tuned_epochs"] == 1 == tuned.fine_tuned_epochs
    # observed in the weights: the frozen early blocks are still ImageNet's, the last blocks moved
    tuned_model, probe_model = foldercnn.load(tuned.model_path).model, clf.model
    imagenet = create_model("effnet-lite0", num_classes=1000, pretrained=True)
    assert torch.equal(tuned_model._blocks[0]._depthwise_conv.weight, imagenet._blocks[0]._depthwise_conv.weight)
    assert torch.equal(tuned_model._bn0.running_mean, imagenet._bn0.running_mean)
    last = tuned_model._blocks[-1]._project_conv.weight
    assert torch.equal(probe_model._blocks[-1]._project_conv.weight, imagenet._blocks[-1]._project_conv.weight)
    assert (last - imagenet._blocks[-1]._project_conv.weight).abs().max() > 1e-4
    assert not torch.equal(tuned_model.head.weight, probe_model.head.weight)
    # the history has the probe (epoch 0) and one fine-tuning epoch, written as training went
    rows = (tmp_path / "tuned" / "history.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[1].startswith("0,")
    assert (tmp_path / "tuned" / "curves.png").is_file()


@pytest.mark.slow
def test_robust_recipe_probe_on_augmented_views(shapes_dirs, tmp_path):
    """The robust recipe's probe sees clean and augmented views (labels stay aligned) and predicts well; the
    log says how many views; the preview shows the augmentation with its new knobs."""
    import foldercnn

    lines = []
    result = foldercnn.train(
        shapes_dirs[0], tmp_path / "robust", recipe="robust", image_size=64, probe_views=1, seed=0, log=lines.append
    )
    n_train = result.n_train
    assert any(f"features: {3 * n_train} training views" in line for line in lines), lines
    clf = foldercnn.load(result.model_path)
    assert clf.metadata["recipe"]["name"] == "robust" and clf.metadata["recipe"]["augment"]["backgrounds"] > 0
    assert foldercnn.evaluate(clf, shapes_dirs[1]).accuracy >= 0.8  # chance is 1/3
    assert (tmp_path / "robust" / "augmentations.png").is_file()
