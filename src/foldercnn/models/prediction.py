"""What a prediction is, and the image-in, prediction-out surface shared by the PyTorch Classifier and the ONNX
OnnxClassifier (no PyTorch import here, so the ONNX path stays torch-free)."""

import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..data.images import ImageDecodeError, decode
from ..errors import FolderCNNError

# A prediction whose calibrated top probability is below this is flagged "uncertain" (stored per model;
# `foldercnn train --uncertain-below` changes it). See README, "How good is the model?".
DEFAULT_UNCERTAIN_BELOW = 0.8  # calibrated: wrong at least one time in five


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict  # class name -> probability, in the model's class order
    path: str | None = None
    uncertain: bool = False  # calibrated top probability below the model's threshold
    # score / the model's threshold (above 1: unfamiliar); None for model files without the unfamiliar section
    unfamiliarity: float | None = None
    # landmark models only: the hand found (data.hands.Hand.to_dict()), or {"found": False}: then there is no answer
    hand: dict | None = None

    @property
    def answered(self):
        return self.hand is None or self.hand["found"]

    def set_hand(self, hand):
        """Attach what a landmark model found; without a hand the prediction is "no hand found", not a guess."""
        if hand is not None:
            self.hand = hand.to_dict()
            return
        self.hand = {"found": False}
        self.label, self.probability, self.uncertain, self.unfamiliarity = None, 0.0, True, None
        self.probabilities = {c: 0.0 for c in self.probabilities}

    @property
    def unfamiliar(self):
        """The image does not look like the training images (None: the model file cannot tell)."""
        if not self.answered:
            return True
        if self.unfamiliarity is None:
            return None if self.hand is None else False  # a landmark model knows only whether a hand was found
        return bool(self.unfamiliarity > 1.0)

    def top_k(self, k):
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self):
        """The JSON form every interface prints (callers add where the image came from)."""
        out = {
            "label": self.label,
            "probability": self.probability,
            "probabilities": self.probabilities,
            "uncertain": self.uncertain,
            "unfamiliar": self.unfamiliar,
            "unfamiliarity": self.unfamiliarity,
        }
        if self.hand is not None:
            out["hand"] = self.hand if self.hand["found"] else None
        return out


def from_probabilities(classes, probs, uncertain_below, path=None, unfamiliarity=None):
    """A Prediction from one row of calibrated probabilities (any sequence of floats)."""
    probs = [float(p) for p in probs]
    if not all(math.isfinite(p) for p in probs):  # never a NaN row: an error with its reason
        raise FolderCNNError(f"{path or 'an image'}: the model gave no finite answer (its weights are unusable)")
    i = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(
        classes[i],
        probs[i],
        dict(zip(classes, probs)),
        None if path is None else str(path),
        probs[i] < uncertain_below,
        None if unfamiliarity is None else float(unfamiliarity),
    )


def _path_of(image):
    return image if isinstance(image, (str, os.PathLike)) else None


class ImageClassifier(Protocol):
    """What both loaded models are (models.inference.Classifier, models.onnx_model.OnnxClassifier), with the same
    signatures: `foldercnn.load` gives either, and predict, evaluate and serve take either."""

    classes: list
    image_size: int
    metadata: dict
    path: str | None
    explains: str | None  # "map", "skeleton", or None (an ONNX file: no explanations)

    def probabilities(self, images_uint8_nhwc: np.ndarray, batch_size: int = 64) -> np.ndarray: ...

    def predict_arrays(
        self, arrays_uint8_nhwc: np.ndarray, paths: list | None = None, batch_size: int = 64
    ) -> list["Prediction"]: ...

    def explain_arrays(
        self, arrays_uint8_nhwc: np.ndarray, paths: list | None = None, batch_size: int = 64, method: str | None = None
    ) -> tuple[list["Prediction"], np.ndarray | None]: ...

    def predict(self, image: Any) -> "Prediction": ...

    def predict_many(self, images: list, batch_size: int = 64) -> list["Prediction"]: ...


class ImagePredictor:
    """`decode`, `predict` and `predict_many` for a classifier with `classes`, `image_size`, `uncertain_below`
    and `predict_arrays((N, S, S, 3) uint8 array, paths, batch_size) -> [Prediction]`."""

    def make_predictions(self, probabilities, unfamiliarity=None, paths=None):
        """Predictions from rows of calibrated probabilities (and their unfamiliarity, when the model has it)."""
        n = len(probabilities)
        paths = [None] * n if paths is None else paths
        scores = [None] * n if unfamiliarity is None else list(unfamiliarity)
        return [
            from_probabilities(self.classes, p, self.uncertain_below, path, u)
            for p, path, u in zip(probabilities, paths, scores)
        ]

    def decode(self, image):
        try:
            return decode(image, self.image_size)
        except ImageDecodeError as e:
            raise FolderCNNError(f"{_path_of(image) or 'image'}: {e}") from None

    def predict(self, image):
        """A path, bytes, a PIL image or an HxWxC array -> Prediction."""
        return self.predict_arrays(self.decode(image)[None], [_path_of(image)])[0]

    def predict_many(self, images, batch_size=64):
        if not images:
            return []
        return self.predict_arrays(
            np.stack([self.decode(im) for im in images]), [_path_of(im) for im in images], batch_size
        )
