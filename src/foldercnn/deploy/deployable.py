"""What the ONNX file computes: the network wrapped with its preprocessing, flip TTA, calibration and unfamiliarity
score (the same functions PyTorch inference runs), and the metadata it carries."""

import json

import torch
from torch import nn

from ..models.prediction import DEFAULT_UNCERTAIN_BELOW
from ..models.preprocess import preprocess
from ..models.tta import predict_logits_and_features
from ..models.unfamiliar import mahalanobis_min
from ..version import __version__


class Deployable(nn.Module):
    """(N, S, S, 3) uint8 RGB -> (calibrated probabilities, logits[, unfamiliarity]): the whole of
    Classifier.predictions with the very functions PyTorch inference runs (preprocess, then
    predict_logits_and_features with its flip TTA, then the Mahalanobis score over its threshold)."""

    def __init__(self, net, metadata, unfamiliarity=None):
        super().__init__()
        self.net = net
        pre = metadata["preprocessing"]
        self.mean, self.std = tuple(pre["mean"]), tuple(pre["std"])
        self.tta = bool(metadata.get("tta", False))
        self.temperature = float((metadata.get("calibration") or {}).get("temperature", 1.0))
        self.unfamiliar = unfamiliarity is not None
        if self.unfamiliar:  # Mahalanobis score (models.unfamiliar.Unfamiliarity.score), divided by its threshold
            u = unfamiliarity
            self.register_buffer("class_means", u.means.float())
            self.register_buffer("basis", u.basis.float())
            self.register_buffer("weights", u.weights.float())
            self.inv_rest, self.threshold = float(u.inv_rest), float(u.threshold)

    def forward(self, images):
        logits, features = predict_logits_and_features(self.net, preprocess(images, self.mean, self.std), self.tta)
        probabilities = torch.softmax(logits / self.temperature, dim=1)
        if not self.unfamiliar:
            return probabilities, logits
        score = mahalanobis_min(features, self.class_means, self.basis, self.weights, self.inv_rest)
        return probabilities, logits, score / self.threshold


def metadata_props(metadata):
    calibration = metadata.get("calibration") or {}
    return {
        "foldercnn_version": __version__,
        "architecture": metadata["architecture"],
        "classes": json.dumps(list(metadata["classes"])),
        "image_size": str(int(metadata["image_size"])),
        "preprocessing": json.dumps(metadata["preprocessing"]),
        "tta": json.dumps(bool(metadata.get("tta", False))),
        "temperature": repr(float(calibration.get("temperature", 1.0))),
        "uncertain_below": repr(float(calibration.get("uncertain_below", DEFAULT_UNCERTAIN_BELOW))),
        "input": "images: uint8 RGB, N x image_size x image_size x 3, decoded and resized as 'preprocessing' says",
    }
