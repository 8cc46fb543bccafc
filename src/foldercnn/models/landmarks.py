"""A gesture classifier on hand landmarks: 21 keypoints -> features that do not change with the hand's place,
size, in-plane rotation or side (left/right, palm/back) -> a standardised linear head.

The network's input is the feature vector (`hand_features`), so the model file holds a tiny network (feature
mean/std buffers and the head); finding the hand is data/hands.py's job.
"""

import torch
from torch import nn

from ..errors import FolderCNNError
from .hand_features import (  # noqa: F401 (the features moved there: numpy only; imported from here too)
    FEATURES,
    FINGERS,
    INDEX_MCP,
    MIDDLE_MCP,
    PINKY_MCP,
    THUMB_TIP,
    TIPS,
    WRIST,
    canonical_2d,
    canonical_3d,
    hand_features,
    joint_angles,
)


class LandmarkNet(nn.Module):
    """Standardised hand features -> logits. `features(x)` is the standardised input (what the unfamiliarity
    score measures distances in); `head` the linear classifier, as every architecture in the registry has."""

    input_kind = "hand-landmarks"

    def __init__(self, num_classes, pretrained=False):
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(FEATURES))
        self.register_buffer("feature_std", torch.ones(FEATURES))
        self.head = nn.Linear(FEATURES, num_classes)

    def features(self, x):
        return (x.float() - self.feature_mean) / self.feature_std

    @staticmethod
    def check_weights(weights):
        """A model file's standardisation must divide by something: training clamps each std to >= 1e-3."""
        std = weights.get("feature_std")
        if std is not None and float(std.min()) < 1e-6:
            return f"feature_std holds {float(std.min()):.3g}, and the features are divided by it"
        return None

    def forward(self, x):
        return self.head(self.features(x))

    def freeze_for_fine_tuning(self, blocks):
        raise FolderCNNError("a landmark model has nothing to fine-tune")

    def unfreeze(self):
        pass
