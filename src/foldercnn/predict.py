"""Classify images with a model file: the Python API behind `foldercnn predict`."""
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .bundle import load_model
from .calibration import DEFAULT_UNCERTAIN_BELOW
from .data import walk_images
from .errors import FolderCNNError
from .images import ImageDecodeError, decode
from .models import predict_logits
from .preprocess import preprocess


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
        return asdict(self)


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

    @torch.no_grad()
    def logits(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits (before temperature scaling).

        tta: None uses the model file's setting; True/False forces flip test-time augmentation on/off.
        """
        tta = self.tta if tta is None else tta
        out = []
        for start in range(0, len(images_uint8_nhwc), batch_size):
            x = preprocess(images_uint8_nhwc[start:start + batch_size].to(self.device), self.mean, self.std)
            out.append(predict_logits(self.model, x.contiguous(memory_format=torch.channels_last), tta).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def probabilities(self, images_uint8_nhwc, batch_size=64):
        """(N, S, S, 3) uint8 tensor -> (N, classes) calibrated probabilities."""
        return torch.softmax(self.logits(images_uint8_nhwc, batch_size) / self.temperature, dim=1)

    def _prediction(self, probs, path=None):
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
        return self._prediction(self.probabilities(x)[0], path)

    def predict_many(self, images, batch_size=64):
        arrays = np.stack([self.decode(im) for im in images]) if images else np.empty((0, 3, 3, 3), np.uint8)
        probs = self.probabilities(torch.from_numpy(arrays), batch_size)
        return [self._prediction(p, im if isinstance(im, (str, os.PathLike)) else None)
                for p, im in zip(probs, images)]


def load(path, device="cpu"):
    """Load a model file for prediction: `foldercnn.load("run/model.safetensors").predict("hand.png")`."""
    model, meta = load_model(path, device)
    return Classifier(model, meta, device, path)


def expand_paths(paths):
    """Images named directly, plus every image file under named folders (recursive, natural order)."""
    found, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found += walk_images(p, skipped)
        elif p.exists():
            found.append(p)
        else:
            raise FolderCNNError(f"not found: {p}")
    return found, skipped


def predict_paths(classifier, paths, batch_size=64):
    """Predict every image under `paths`; returns (predictions, [(path, reason)] skipped)."""
    from .data import decode_images
    files, skipped = expand_paths(paths)
    array, good, bad = decode_images(files, classifier.image_size, desc="reading images")
    skipped += [(files[i], reason) for i, reason in bad]
    probs = classifier.probabilities(torch.from_numpy(array), batch_size)
    return [classifier._prediction(p, files[i]) for p, i in zip(probs, good)], skipped
