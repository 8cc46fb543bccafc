"""A loaded model file, ready to classify: the one batched-inference path used by predict, evaluate, serve
and training's calibration."""
import os
import numpy as np
import torch

from ..data.images import ImageDecodeError, decode
from ..errors import FolderCNNError
from ..prediction import DEFAULT_UNCERTAIN_BELOW, Prediction, from_probabilities  # noqa: F401 (re-exported)
from .file import load_model
from .preprocess import preprocess
from .registry import predict_logits

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
        return from_probabilities(self.classes, probs.tolist(), self.uncertain_below, path)

    def predict_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64):
        """(N, S, S, 3) uint8 numpy array of decoded images -> N Predictions (the serve and predict path)."""
        probs = self.probabilities(torch.from_numpy(np.ascontiguousarray(arrays_uint8_nhwc)), batch_size)
        paths = paths if paths is not None else [None] * len(probs)
        return [self.prediction(p, path) for p, path in zip(probs, paths)]

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
