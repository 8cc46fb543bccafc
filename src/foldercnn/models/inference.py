"""A loaded model file, ready to classify: the one batched-inference path used by predict, evaluate, serve
and training's calibration."""
import numpy as np
import torch

from .file import load_model_file
from .prediction import DEFAULT_UNCERTAIN_BELOW, ImagePredictor, Prediction  # noqa: F401 (re-exported)
from .preprocess import preprocess
from .registry import predict_logits_and_features


@torch.no_grad()
def batched_logits(model, images_uint8_nhwc, mean, std, device="cpu", tta=False, batch_size=64, features=False):
    """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits: eval mode, fp32, channels-last, in batches.

    features=True returns (logits, (N, D) penultimate features) from the same pass (features, then the head;
    with tta both are the mean over the image and its mirror image)."""
    was_training = model.training
    model.eval()
    logits, feats = [], []
    for start in range(0, len(images_uint8_nhwc), batch_size):
        x = preprocess(images_uint8_nhwc[start:start + batch_size].to(device), mean, std)
        lg, ft = predict_logits_and_features(model, x.contiguous(memory_format=torch.channels_last), tta)
        logits.append(lg.cpu())
        if features:
            feats.append(ft.cpu())
    model.train(was_training)
    logits = torch.cat(logits) if logits else torch.empty(0, model.head.out_features)
    if not features:
        return logits
    return logits, (torch.cat(feats) if feats else torch.empty(0, model.head.in_features))


class Classifier(ImagePredictor):
    """A loaded model file. `predict` takes a path, bytes, a PIL image or an HxWxC array."""

    def __init__(self, model, metadata, device="cpu", path=None, unfamiliarity=None):
        self.model = model
        self.unfamiliarity = unfamiliarity  # models.unfamiliar.Unfamiliarity, or None (older model files)
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

    def logits_and_unfamiliarity(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(logits, (N,) unfamiliarity or None) from one forward pass: the features, then the head."""
        tta = self.tta if tta is None else tta
        if self.unfamiliarity is None:
            return self.logits(images_uint8_nhwc, batch_size, tta), None
        logits, features = batched_logits(self.model, images_uint8_nhwc, self.mean, self.std, self.device, tta,
                                          batch_size, features=True)
        return logits, self.unfamiliarity.unfamiliarity(features)

    def probabilities(self, images_uint8_nhwc, batch_size=64):
        """(N, S, S, 3) uint8 tensor -> (N, classes) calibrated probabilities."""
        return torch.softmax(self.logits(images_uint8_nhwc, batch_size) / self.temperature, dim=1)

    def predictions(self, images_uint8_nhwc, paths=None, batch_size=64):
        """(N, S, S, 3) uint8 tensor -> N Predictions (probabilities and unfamiliarity from one pass)."""
        logits, unfamiliarity = self.logits_and_unfamiliarity(images_uint8_nhwc, batch_size)
        probs = torch.softmax(logits / self.temperature, dim=1)
        return self.make_predictions(probs.tolist(), None if unfamiliarity is None else unfamiliarity.tolist(),
                                     paths)

    def predict_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64):
        """(N, S, S, 3) uint8 numpy array of decoded images -> N Predictions (the serve and predict path)."""
        return self.predictions(torch.from_numpy(np.ascontiguousarray(arrays_uint8_nhwc)), paths, batch_size)


def load(path, device="cpu"):
    """Load a model file for prediction: `foldercnn.load("run/model.safetensors").predict("hand.png")`."""
    model, meta, unfamiliarity = load_model_file(path, device)
    return Classifier(model, meta, device, path, unfamiliarity)
