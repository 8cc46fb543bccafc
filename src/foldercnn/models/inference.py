"""A loaded model file, ready to classify: the one batched-inference path used by predict, evaluate, serve
and training's calibration."""

import numpy as np
import torch

from .explain import batched_explanations
from .file import load_model_file
from .prediction import DEFAULT_UNCERTAIN_BELOW, ImagePredictor, Prediction  # noqa: F401 (re-exported)
from .preprocess import decode_size, eval_batches
from .registry import get_spec, inference_batch
from .tta import predict_logits_and_features


def takes_hands(model):
    return getattr(model, "input_kind", "image") == "hand-landmarks"


@torch.no_grad()
def hand_pass(model, images_uint8_nhwc):
    """(logits, features, FoundHands) of a landmark model on decoded images; the rows of images without a hand
    are zeros (FoundHands.found says which)."""
    from ..data.hands import find_hands

    found = find_hands(np.asarray(images_uint8_nhwc))
    return (*landmark_logits(model, found), found)


@torch.no_grad()
def landmark_logits(model, found):
    """(logits, features) of a landmark model on hands already found (data/hands.FoundHands); zeros where none."""
    from .landmarks import hand_features

    keep = torch.from_numpy(found.found)
    logits = torch.zeros(len(keep), model.head.out_features)
    feats = torch.zeros(len(keep), model.head.in_features)
    if keep.any():
        feats[keep] = model.features(
            torch.from_numpy(hand_features(found.points[found.found], found.world[found.found]))
        ).float()
        logits[keep] = model.head(feats[keep]).float()
    return logits, feats


@torch.no_grad()
def batched_logits(model, images_uint8_nhwc, mean, std, device="cpu", tta=False, batch_size=64, features=False):
    """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits: eval mode, fp32, channels-last, in batches.

    features=True returns (logits, (N, D) penultimate features) from the same pass (features, then the head;
    with tta both are the mean over the image and its mirror image)."""
    if takes_hands(model):
        logits, feats, _ = hand_pass(model.cpu(), images_uint8_nhwc)
        return (logits, feats) if features else logits
    was_training = model.training
    model.eval()
    logits, feats = [], []
    for x in eval_batches(images_uint8_nhwc, mean, std, device, batch_size):
        lg, ft = predict_logits_and_features(model, x, tta)
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
        pre = metadata["preprocessing"]
        self.image_size = decode_size(metadata["image_size"], pre.get("fit", "squash"))
        self.mean, self.std = pre["mean"], pre["std"]
        self.tta = bool(metadata.get("tta", False))
        calibration = metadata.get("calibration") or {}
        # probabilities are softmax(logits / temperature); models without calibration use 1
        self.temperature = float(calibration.get("temperature", 1.0))
        self.uncertain_below = float(calibration.get("uncertain_below", DEFAULT_UNCERTAIN_BELOW))
        self.max_batch = inference_batch(metadata["architecture"], self.image_size)
        self.explains = get_spec(metadata["architecture"]).explanation  # "map" or "skeleton"

    def logits(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(N, S, S, 3) uint8 tensor -> (N, classes) float32 logits (before temperature scaling).

        tta: None uses the model file's setting; True/False forces flip test-time augmentation on/off.
        """
        tta = self.tta if tta is None else tta
        return batched_logits(
            self.model, images_uint8_nhwc, self.mean, self.std, self.device, tta, min(batch_size, self.max_batch)
        )

    def answers(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(logits, (N,) unfamiliarity or None, FoundHands or None) from one pass. A landmark model answers only
        the images in which a hand is found (FoundHands.found); an image model answers every image (None)."""
        if not takes_hands(self.model):
            return (*self.logits_and_unfamiliarity(images_uint8_nhwc, batch_size, tta), None)
        logits, features, found = hand_pass(self.model, images_uint8_nhwc)
        unfamiliarity = None if self.unfamiliarity is None else self.unfamiliarity.unfamiliarity(features)
        return logits, unfamiliarity, found

    def logits_and_unfamiliarity(self, images_uint8_nhwc, batch_size=64, tta=None):
        """(logits, (N,) unfamiliarity or None) from one forward pass: the features, then the head."""
        if takes_hands(self.model):
            return self.answers(images_uint8_nhwc, batch_size, tta)[:2]
        tta = self.tta if tta is None else tta
        if self.unfamiliarity is None:
            return self.logits(images_uint8_nhwc, batch_size, tta), None
        logits, features = batched_logits(
            self.model,
            images_uint8_nhwc,
            self.mean,
            self.std,
            self.device,
            tta,
            min(batch_size, self.max_batch),
            features=True,
        )
        return logits, self.unfamiliarity.unfamiliarity(features)

    def probabilities(self, images_uint8_nhwc, batch_size=64):
        """(N, S, S, 3) uint8 images (a numpy array or a tensor) -> (N, classes) float32 numpy calibrated
        probabilities, as OnnxClassifier.probabilities gives them."""
        if isinstance(images_uint8_nhwc, np.ndarray):
            images_uint8_nhwc = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc))
        return torch.softmax(self.logits(images_uint8_nhwc, batch_size) / self.temperature, dim=1).numpy()

    def predictions(self, images_uint8_nhwc, paths=None, batch_size=64):
        """(N, S, S, 3) uint8 tensor -> N Predictions (probabilities and unfamiliarity from one pass)."""
        logits, unfamiliarity, found = self.answers(images_uint8_nhwc, batch_size)
        probs = torch.softmax(logits / self.temperature, dim=1)
        predictions = self.make_predictions(
            probs.tolist(), None if unfamiliarity is None else unfamiliarity.tolist(), paths
        )
        if found is not None:
            for i, p in enumerate(predictions):
                p.set_hand(found.hand(i))
        return predictions

    def answers_and_maps(self, images_uint8_nhwc, batch_size=64, tta=None, method=None):
        """answers() plus (N, h, w) float32 maps in [0, 1] of where an image model looked for its predicted class,
        from the same pass (a landmark model: None; its explanation is the hand it found)."""
        if takes_hands(self.model):
            return (*self.answers(images_uint8_nhwc, batch_size, tta), None)
        tta = self.tta if tta is None else tta
        batch = min(batch_size, self.max_batch)
        ex = batched_explanations(self.model, images_uint8_nhwc, self.mean, self.std, self.device, tta, batch, method)
        unfamiliarity = None if self.unfamiliarity is None else self.unfamiliarity.unfamiliarity(ex.features)
        return ex.logits, unfamiliarity, None, ex.maps.numpy()

    def explain_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64, method=None):
        """(N Predictions, (N, h, w) float32 maps in [0, 1] or None) from one pass: an image model's class
        activation maps for its predicted classes; a landmark model's explanation is the hand it found
        (Prediction.hand), so its maps are None."""
        images = torch.from_numpy(np.ascontiguousarray(arrays_uint8_nhwc))
        if takes_hands(self.model):
            return self.predictions(images, paths, batch_size), None
        logits, unfamiliarity, _, maps = self.answers_and_maps(images, batch_size, method=method)
        probs = torch.softmax(logits / self.temperature, dim=1)
        scores = None if unfamiliarity is None else unfamiliarity.tolist()
        return self.make_predictions(probs.tolist(), scores, paths), maps

    def predict_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64):
        """(N, S, S, 3) uint8 numpy array of decoded images -> N Predictions (the serve and predict path)."""
        return self.predictions(torch.from_numpy(np.ascontiguousarray(arrays_uint8_nhwc)), paths, batch_size)


def load(path, device="cpu"):
    """Load a model file for prediction: `foldercnn.load("run/model.safetensors").predict("hand.png")`."""
    model, meta, unfamiliarity = load_model_file(path, device)
    return Classifier(model, meta, device, path, unfamiliarity)
