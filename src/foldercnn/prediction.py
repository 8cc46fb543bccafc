"""What a prediction is, shared by the PyTorch and the ONNX paths (no PyTorch import here)."""
from dataclasses import dataclass

# A prediction whose calibrated top probability is below this is flagged "uncertain" (stored per model;
# `foldercnn train --uncertain-below` changes it). See README, "How good is the model?".
DEFAULT_UNCERTAIN_BELOW = 0.8  # calibrated: wrong at least one time in five


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict  # class name -> probability, in the model's class order
    path: str = None
    uncertain: bool = False  # calibrated top probability below the model's threshold
    # score / the model's threshold (above 1: unfamiliar); None for model files without the unfamiliar section
    unfamiliarity: float = None

    @property
    def unfamiliar(self):
        """The image does not look like the training images (None: the model file cannot tell)."""
        return None if self.unfamiliarity is None else bool(self.unfamiliarity > 1.0)

    def top_k(self, k):
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]

    def to_dict(self):
        """The JSON form every interface prints (callers add where the image came from)."""
        return {"label": self.label, "probability": self.probability, "probabilities": self.probabilities,
                "uncertain": self.uncertain, "unfamiliar": self.unfamiliar, "unfamiliarity": self.unfamiliarity}


def from_probabilities(classes, probs, uncertain_below, path=None, unfamiliarity=None):
    """A Prediction from one row of calibrated probabilities (any sequence of floats)."""
    probs = [float(p) for p in probs]
    i = max(range(len(probs)), key=probs.__getitem__)
    return Prediction(classes[i], probs[i], dict(zip(classes, probs)), None if path is None else str(path),
                      probs[i] < uncertain_below, None if unfamiliarity is None else float(unfamiliarity))
