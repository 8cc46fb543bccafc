"""Flip test-time augmentation: the mean over an image and its mirror image. One definition, used by training's
validation, PyTorch inference and the ONNX export (which wraps FlipTTA around the network)."""

import torch
from torch import nn


class FlipTTA(nn.Module):
    """A network whose logits are the mean of its logits on the image and on its mirror image."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, x, tta=True)


def predict_logits(model, x, tta=False):
    """Float32 logits; with tta, averaged over the image and its mirror image (test-time augmentation)."""
    logits = model(x).float()
    if tta:
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


def predict_logits_and_features(model, x, tta=False):
    """(float32 logits, float32 penultimate features) from one pass: features, then the head. With tta the
    features of the image and its mirror image (one batch: one network call) are averaged; the head is linear,
    so the logits are the mean of both images' logits, as predict_logits gives them. Eval mode only (dropout
    before the head is off). The ONNX export traces this same function."""
    if tta:
        n = x.shape[0]
        both = model.features(torch.cat([x, x.flip(-1)])).float()
        features = (both[:n] + both[n:]) / 2
    else:
        features = model.features(x).float()
    head = model.head
    return torch.nn.functional.linear(features, head.weight.float(), head.bias.float()), features
