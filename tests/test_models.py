"""Model registry and summaries."""

import pytest
import torch

from foldercnn import FolderCNNError
from foldercnn.models.registry import available_models, create_model
from foldercnn.models.summary import count_parameters, summary


def test_tutorial_cnn_has_exactly_the_keras_parameter_count():
    model = create_model("tutorial-cnn", num_classes=3, image_size=150)
    assert count_parameters(model) == 3_473_475
    assert model(torch.zeros(2, 3, 150, 150)).shape == (2, 3)


def test_summary_lists_layers_shapes_and_total():
    text = summary(create_model("tutorial-cnn", num_classes=3), 150)
    assert "Total params: 3,473,475" in text
    assert "(64, 148, 148)" in text and "(6272,)" in text and "Linear" in text


@pytest.mark.parametrize("size", [32, 64, 97])
def test_fast_cnn_any_input_size(size):
    model = create_model("fast-cnn", num_classes=5)
    assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)


def test_registry():
    assert {"tutorial-cnn", "fast-cnn"} <= set(available_models())
    with pytest.raises(FolderCNNError, match="unknown model 'nope'"):
        create_model("nope", num_classes=2)
