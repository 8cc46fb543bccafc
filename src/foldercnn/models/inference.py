"""A loaded model file, ready to classify: the one batched-inference path used by predict, evaluate, serve
and training's calibration."""
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..data.images import ImageDecodeError, decode
from ..errors import FolderCNNError
from .file import load_model
from .preprocess import preprocess
from .registry import predict_logits

# A prediction whose calibrated top probability is below this is flagged "uncertain" (stored per model;
# `foldercnn train --uncertain-below` changes it). See README, "How good is the model?".
DEFAULT_UNCERTAIN_BELOW = 0.8  # calibrated: wrong at least one time in five


@torch.no_grad()
def batched_logits(model, images_uint8_nhwc, mean, std, device="cpu", tta=False, batch_size=64):
    """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits: eval mode, fp32, channels-last, in batches."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(images_uint8_nhwc), batch_size):
        x = preprocess(images_uint8_nhwc[start:start + batch_size].to(device), mean, std)
        out.append(predict_logits(model, x.contiguous(memory_format=torch.channels_last), tta).cpu())
    model.train(was_training)
    if out:
        return torch.cat(out)
    return torch.empty(0, model.head.out_features)


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict  # class name -> probability, in the model's class order
    path: str = None
    uncertain: bool = False  # calibrated top probability below the model's threshold

    def top_k(self, k):
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self):
        """The JSON form every interface prints (callers add where the image came from)."""
        return {"label": self.label, "probability": self.probability, "probabilities": self.probabilities,
                "uncertain": self.uncertain}


class Classifier:
    """A loaded model file. `predict` takes a path, bytes, a PIL image or an HxWxC array."""

    def __init__(self, model, metadata, device="cpu", path=None):
        self.model = model
        self.path = None if path is None else str(path)
        self.metadata = metadata
        self.device = torch.device(device)
        self.classes = list(metadata["classes"])
        self.image_size = int(metadata["image_size"])
        pre = metadata["preprocessing"]
        self.mean, self.std = pre["mean"], pre["std"]
        self.tta = bool(metadata.get("tta", False))
        calibration = metadata.get("calibration") or {}
        # probabilities are softmax(logits / temperature); models without calibration use 1
        self.temperature = float(calibration.get("temperature", 1.0))
        self.uncertain_below = float(calibration.get("uncertain_below", DEFAULT_UNCERTAIN_BELOW))

    def logits(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits (before temperature scaling).

        tta: None uses the model file's setting; True/False forces flip test-time augmentation on/off.
        """
        tta = self.tta if tta is None else tta
        return batched_logits(self.model, images_uint8_nhwc, self.mean, self.std, self.device, tta, batch_size)

    def probabilities(self, images_uint8_nhwc, batch_size=64):
        """(N, S, S, 3) uint8 tensor -> (N, classes) calibrated probabilities."""
        return torch.softmax(self.logits(images_uint8_nhwc, batch_size) / self.temperature, dim=1)

    def prediction(self, probs, path=None):
        """A Prediction from one row of calibrated probabilities."""
        i = int(probs.argmax())
        return Prediction(self.classes[i], float(probs[i]),
                          {c: float(p) for c, p in zip(self.classes, probs.tolist())},
                          None if path is None else str(path), bool(probs[i] < self.uncertain_below))

    def decode(self, image):
        try:
            return decode(image, self.image_size)
        except ImageDecodeError as e:
            name = image if isinstance(image, (str, os.PathLike)) else "image"
            raise FolderCNNError(f"{name}: {e}") from None

    def predict(self, image):
        path = image if isinstance(image, (str, os.PathLike)) else None
        x = torch.from_numpy(self.decode(image)).unsqueeze(0)
        return self.prediction(self.probabilities(x)[0], path)

    def predict_many(self, images, batch_size=64):
        arrays = np.stack([self.decode(im) for im in images]) if images else np.empty((0, 3, 3, 3), np.uint8)
        probs = self.probabilities(torch.from_numpy(arrays), batch_size)
        return [self.prediction(p, im if isinstance(im, (str, os.PathLike)) else None)
                for p, im in zip(probs, images)]


def load(path, device="cpu"):
    """Load a model file for prediction: `foldercnn.load("run/model.safetensors").predict("hand.png")`."""
    model, meta = load_model(path, device)
    return Classifier(model, meta, device, path)
