"""A fine-tuning keeps what its frozen layers make of the clean images: the passes after it run only the tuned
blocks on those outputs and give what the whole network gives."""

import dataclasses

import pytest
import torch

from foldercnn.data.folders import DecodedImages
from foldercnn.models.registry import create_model
from foldercnn.training.finish import final_pass, kept_or_final_pass
from foldercnn.training.recipes import get_recipe
from foldercnn.training.run import RunContext
from foldercnn.training.transfer import KEEP_MAX_BYTES, probe_features, tail_scores


def images(n, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)
    return DecodedImages(pixels, torch.arange(n) % 3, [f"{i}.png" for i in range(n)], ["a", "b", "c"], [])


@pytest.fixture(scope="module")
def setup():
    recipe = dataclasses.replace(get_recipe("transfer"), image_size=64)
    model = create_model("effnet-lite0", 3, pretrained=True)
    return model, recipe, images(10, seed=1), images(6, seed=2)


@pytest.mark.parametrize("tuned_blocks", [0, 1, 4, 16])
def test_the_prefix_and_the_tail_make_the_feature_map(setup, tuned_blocks):
    model = setup[0].eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model.feature_map(x)
        split = model.tail_map(model.frozen_prefix(x, tuned_blocks), tuned_blocks)
    assert torch.allclose(whole, split, atol=1e-6)


def fine_tune_like_change(model, tuned_blocks):
    """What a fine-tuning does to the weights: only the last blocks and the head move."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for block in model._blocks[-tuned_blocks:]:
            block._project_conv.weight.add_(0.05 * torch.randn(block._project_conv.weight.shape, generator=g))
        model.head.weight.add_(torch.randn(model.head.weight.shape, generator=g))


def test_passes_on_kept_outputs_equal_the_whole_network_after_the_tuned_blocks_changed(setup):
    model, recipe, train, val = setup
    model.load_state_dict(create_model("effnet-lite0", 3, pretrained=True).state_dict())
    features = probe_features(model, train, val, recipe, RunContext(), flips=False, tuned_blocks=4)
    frozen = features.frozen
    assert frozen.tuned_blocks == 4 and len(frozen.train) == len(train) and len(frozen.val) == len(val)
    fine_tune_like_change(model, 4)
    for data, which in ((val, "val"), (train, "train")):
        logits, feats, answered = kept_or_final_pass(model, data, recipe, "cpu", frozen, which)
        whole_logits, whole_feats, _ = final_pass(model, data, recipe, "cpu")
        assert answered.all()
        assert torch.allclose(logits, whole_logits, atol=1e-4) and torch.allclose(feats, whole_feats, atol=1e-4)
    loss, accuracy = tail_scores(model, frozen, val.labels, "cpu")
    whole_logits = final_pass(model, val, recipe, "cpu")[0]
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(whole_logits, val.labels).item(), abs=1e-4)
    assert accuracy == (whole_logits.argmax(1) == val.labels).float().mean().item()


def test_a_probe_alone_keeps_its_features_and_its_passes_only_run_the_head(setup):
    model, recipe, train, val = setup
    features = probe_features(model, train, val, recipe, RunContext())
    assert features.frozen.tuned_blocks is None and len(features.train) == 2 * len(train)  # clean and mirrored
    torch.testing.assert_close(features.frozen.train, features.train[: len(train)])
    logits, feats, _ = kept_or_final_pass(model, val, recipe, "cpu", features.frozen, "val")
    whole_logits, whole_feats, _ = final_pass(model, val, recipe, "cpu")
    assert torch.allclose(logits, whole_logits, atol=1e-4) and torch.allclose(feats, whole_feats, atol=1e-4)


def test_without_kept_outputs_or_with_flip_tta_the_whole_network_runs(setup):
    """No kept set for these images (a sample of the training images), or test-time augmentation (the mirror
    image's frozen outputs were not kept): the pass is final_pass itself."""
    model, recipe, train, val = setup
    frozen = probe_features(model, train, val, recipe, RunContext(), flips=False, tuned_blocks=4).frozen
    fine_tune_like_change(model, 4)
    whole = final_pass(model, val, dataclasses.replace(recipe, tta=True), "cpu")[0]
    assert torch.equal(
        kept_or_final_pass(model, val, dataclasses.replace(recipe, tta=True), "cpu", frozen, "val")[0], whole
    )
    assert torch.equal(
        kept_or_final_pass(model, val, recipe, "cpu", frozen, None)[0], final_pass(model, val, recipe, "cpu")[0]
    )
    bf16 = dataclasses.replace(frozen, precision="bf16")  # calibration must see what prediction (fp32) computes
    assert torch.equal(
        kept_or_final_pass(model, val, recipe, "cpu", bf16, "val")[0], final_pass(model, val, recipe, "cpu")[0]
    )


def test_outputs_over_the_memory_bound_are_not_kept(setup, monkeypatch):
    model, recipe, train, val = setup
    monkeypatch.setattr("foldercnn.training.transfer.KEEP_MAX_BYTES", 1024)
    frozen = probe_features(model, train, val, recipe, RunContext(), flips=False, tuned_blocks=4).frozen
    assert frozen.train is None and frozen.val is None
    assert KEEP_MAX_BYTES == 1 << 30
