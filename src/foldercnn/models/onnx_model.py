"""Classify images with an ONNX file exported by `foldercnn export`: numpy, Pillow and onnxruntime only.

    import foldercnn
    clf = foldercnn.load("model.onnx")   # or foldercnn.models.onnx_model.OnnxClassifier("model.onnx")
    p = clf.predict("hand.png")          # a path, bytes, a PIL image or an HxWxC array
    print(p.label, p.probability, p.uncertain)

Decoding is foldercnn's own (EXIF orientation, transparency on white, the same resize), so the network sees
the pixels it was trained on; everything after decoding (rescale, mean/std, layout, TTA, temperature,
softmax) is inside the graph. Nothing here imports PyTorch, so a small device needs only
`pip install foldercnn[runtime]`-style dependencies.
"""

import json
from pathlib import Path

import numpy as np

from ..data.images import Letterbox
from ..errors import FolderCNNError
from .prediction import ImagePredictor

INPUT = "images"
FEATURES_INPUT = "features"  # a hands model's graph: the head on the hand's features (the finder runs before it)
NO_EXPLANATIONS = "an exported .onnx model carries no explanations: explain with its .safetensors model file"
REQUIRED_PROPS = ("classes", "image_size", "preprocessing", "temperature", "uncertain_below")


class OnnxClassifier(ImagePredictor):
    """An exported model: the same `predict`, `predict_many`, `predict_arrays` as foldercnn.load()'s."""

    def __init__(self, path, threads=None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FolderCNNError("running an .onnx model needs onnxruntime (pip install onnxruntime)") from None
        path = Path(path)
        if not path.is_file():
            raise FolderCNNError(f"model file not found: {path}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            # idle worker threads must not spin on cores that other requests' threads need (serve)
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for unreadable files
            raise FolderCNNError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in REQUIRED_PROPS if k not in props]
        if missing:
            raise FolderCNNError(
                f"{path} is an ONNX model but not one exported by foldercnn (no {', '.join(missing)} in its metadata)"
            )
        try:
            self.classes = json.loads(props["classes"])
            self.image_size = int(props["image_size"])
            self.preprocessing = json.loads(props["preprocessing"])
            self.temperature = float(props["temperature"])
            self.uncertain_below = float(props["uncertain_below"])
        except (ValueError, TypeError) as e:
            raise FolderCNNError(f"{path}: corrupt foldercnn metadata in the ONNX file ({e})") from None
        if not (
            isinstance(self.classes, list)
            and all(isinstance(c, str) for c in self.classes)
            and 8 <= self.image_size <= 1024
        ):
            raise FolderCNNError(f"{path}: corrupt foldercnn metadata in the ONNX file")
        inputs = self.session.get_inputs()
        self.takes_hands = len(inputs) == 1 and (inputs[0].name, inputs[0].type) == (FEATURES_INPUT, "tensor(float)")
        if self.takes_hands:
            self._check_finder(path)
        elif len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)":
            raise FolderCNNError(f"{path}: expected one uint8 input named '{INPUT}'")
        self.has_unfamiliarity = "unfamiliarity" in {o.name for o in self.session.get_outputs()}
        self.path = str(path)
        self.explains = None  # the graph ends at the probabilities: no class activation maps
        self.metadata = {
            **props,
            "classes": self.classes,
            "image_size": self.image_size,
            "preprocessing": self.preprocessing,
            "format": "onnx",
        }

    def _check_finder(self, path):
        """A hands model's head reads features of hands found as in training: the same finder, letterboxed."""
        from ..data.hands import describe_finder

        hands = self.preprocessing.get("hands") if isinstance(self.preprocessing, dict) else None
        if hands != describe_finder() or self.preprocessing.get("fit") != "letterbox":
            raise FolderCNNError(
                f"{path} was exported from a model trained on hands found by another hand finder "
                f"({str(hands)[:200]}); export it again with this foldercnn"
            )
        self.image_size = Letterbox(self.image_size)

    def _hand_outputs(self, images_uint8_nhwc):
        """(calibrated probabilities, FoundHands): the finder on each image, then the head on the hands found;
        an image without a hand gets even probabilities, as the PyTorch model's zero logits give."""
        from ..data.hands import find_hands
        from .hand_features import hand_features

        found = find_hands(np.ascontiguousarray(images_uint8_nhwc, dtype=np.uint8))
        probs = np.full((len(found.found), len(self.classes)), 1 / len(self.classes), np.float32)
        if found.found.any():
            x = hand_features(found.points[found.found], found.world[found.found])
            probs[found.found] = self.session.run(["probabilities"], {FEATURES_INPUT: x})[0]
        return probs, found

    def probabilities(self, images_uint8_nhwc, batch_size=64):
        """(N, S, S, 3) uint8 array -> (N, classes) float32 calibrated probabilities."""
        if self.takes_hands:
            return self._hand_outputs(images_uint8_nhwc)[0]
        images = np.ascontiguousarray(images_uint8_nhwc, dtype=np.uint8)
        out = [
            self.session.run(["probabilities"], {INPUT: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.empty((0, len(self.classes)), np.float32)

    def outputs(self, images_uint8_nhwc, batch_size=64):
        """(probabilities, unfamiliarity or None) for (N, S, S, 3) uint8 images."""
        if self.takes_hands:
            return self._hand_outputs(images_uint8_nhwc)[0], None
        images = np.ascontiguousarray(images_uint8_nhwc, dtype=np.uint8)
        names = ["probabilities"] + (["unfamiliarity"] if self.has_unfamiliarity else [])
        runs = [self.session.run(names, {INPUT: images[i : i + batch_size]}) for i in range(0, len(images), batch_size)]
        if not runs:
            return np.empty((0, len(self.classes)), np.float32), None
        probs = np.concatenate([r[0] for r in runs])
        return probs, (np.concatenate([r[1] for r in runs]) if self.has_unfamiliarity else None)

    def predict_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64):
        if self.takes_hands:
            probs, found = self._hand_outputs(arrays_uint8_nhwc)
            predictions = self.make_predictions(probs, None, paths)
            for i, p in enumerate(predictions):
                p.set_hand(found.hand(i))
            return predictions
        probs, unfamiliarity = self.outputs(arrays_uint8_nhwc, batch_size)
        return self.make_predictions(probs, unfamiliarity, paths)

    def explain_arrays(self, arrays_uint8_nhwc, paths=None, batch_size=64, method=None):
        raise FolderCNNError(NO_EXPLANATIONS)


def is_onnx(path):
    return str(path).lower().endswith(".onnx")
