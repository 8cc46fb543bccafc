"""Where an image model looked: class activation maps on its last convolution's output, through the registry's
interface (`feature_map`, `pool_features`, `head`), computed in the same pass as the prediction.

The pass runs the network up to the feature map without gradients, then the small rest (pooling, head) with
them: the map's gradient for the predicted class costs a backward pass through the head only.
benchmarks/explain.py measures the methods on a pointing game and the cost against a plain prediction.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FolderCNNError
from .preprocess import eval_batches

METHODS = ("grad-cam", "grad-cam++", "layer-cam")
DEFAULT_METHOD = "grad-cam"  # benchmarks/README.md, "Where the model looked": the pointing game chose it
GRID = 16  # the side of the grid the API and the page get
SIDE = 32  # maps leave batched_explanations as SIDE x SIDE over the whole image, whatever the architecture


@dataclass
class Explained:
    """One pass over a batch: float32 logits, penultimate features and (N, h, w) maps in [0, 1] (1: the place
    that raised the predicted class most)."""

    logits: torch.Tensor
    features: torch.Tensor
    maps: torch.Tensor


def check_method(method):
    if method not in METHODS:
        raise FolderCNNError(f"unknown explanation method '{method}' (available: {', '.join(METHODS)})")
    return method


def can_explain(model):
    return all(hasattr(model, name) for name in ("feature_map", "pool_features", "map_layers"))


def map_geometry(layers, size):
    """(origin, stride, cells): map cell i is centred on input pixel origin + stride * i, in pixel indices (pixel j's
    centre is j). Traced through the convolutions and poolings: "valid" convolutions shrink the map's reach and
    TensorFlow's "same" padding (EfficientNet) puts its extra pixel right and bottom, half a cell off the even
    spread a plain resize assumes."""
    origin, stride, n = 0.0, 1.0, size
    for module in (m for layer in layers for m in layer.modules()):
        if not isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            continue
        k, s, p = (v if isinstance(v, int) else v[0] for v in (module.kernel_size, module.stride, module.padding))
        if type(module).__name__ == "Conv2dSame":
            p = max((math.ceil(n / s) - 1) * s + k - n, 0) // 2
            n_out = math.ceil(n / s)
        else:
            n_out = (n + 2 * p - k) // s + 1
        origin, stride, n = origin + stride * ((k - 1) / 2 - p), stride * s, n_out
    return origin, stride, n


def canonical_maps(raw, geometry, size, side=SIDE):
    """(N, h, w) maps of cells placed by map_geometry -> (N, side, side) over the whole size x size image, each
    scaled to a peak of 1 (beyond the outermost cells, the edge value)."""
    origin, stride, cells = geometry
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) * size / side - 0.5
    q = (centres - origin) / stride  # in cells
    g = 2 * q / max(cells - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).expand(len(raw), side, side, 2)
    out = F.grid_sample(raw[:, None].float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return scaled(out[:, 0].clamp(min=0))


def class_maps(activations, gradients, method):
    """(N, C, h, w) activations and their gradients for one class each -> (N, h, w) maps, each scaled to [0, 1]."""
    if method == "grad-cam":  # channel weights: the mean gradient
        raw = (gradients.mean((2, 3), keepdim=True) * activations).sum(1)
    elif method == "layer-cam":  # each place weighted by its own positive gradient
        raw = (gradients.clamp(min=0) * activations).sum(1)
    else:  # grad-cam++: per-place weights from the second and third powers of the gradient
        g2, g3 = gradients**2, gradients**3
        denominator = 2 * g2 + activations.sum((2, 3), keepdim=True) * g3
        alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        weights = (alpha * gradients.clamp(min=0)).sum((2, 3), keepdim=True)
        raw = (weights * activations).sum(1)
    return scaled(raw.clamp(min=0))


def scaled(maps):
    """Each (h, w) map divided by its maximum (an all-zero map stays zero)."""
    top = maps.flatten(1).amax(1).view(-1, 1, 1)
    return torch.where(top > 0, maps / torch.where(top > 0, top, torch.ones_like(top)), torch.zeros_like(maps))


def explain_batch(model, x, tta=False, method=DEFAULT_METHOD, side=None):
    """Logits, features and maps for the predicted class of a normalised batch (eval mode): the map's own cells,
    or with side, side x side over the whole image (canonical_maps). With tta the image and its mirror image go
    through as one batch, as for a plain prediction; the mirror's map is mirrored back and averaged, so a
    mirrored image gets exactly the mirrored map."""
    n = x.shape[0]
    with torch.no_grad():
        activations = model.feature_map(torch.cat([x, x.flip(-1)]) if tta else x).float()
    with torch.enable_grad():
        activations.requires_grad_(True)
        features = model.pool_features(activations).float()
        if tta:
            features = (features[:n] + features[n:]) / 2
        head = model.head
        logits = F.linear(features, head.weight.float(), head.bias.float())
        target = logits.argmax(1)
        (gradients,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), activations)
    maps = class_maps(activations.detach(), gradients, method)
    if side is not None:
        maps = canonical_maps(maps, map_geometry(model.map_layers(), x.shape[-1]), x.shape[-1], side)
    if tta:
        maps = scaled(maps[:n] + maps[n:].flip(-1))
    return Explained(logits.detach(), features.detach(), maps)


def batched_explanations(model, images_uint8_nhwc, mean, std, device="cpu", tta=False, batch_size=64, method=None):
    """explain_batch over (N, S, S, 3) uint8 images in batches, on CPU tensors: one Explained for all, its maps
    SIDE x SIDE over the whole image."""
    if not can_explain(model):
        raise FolderCNNError(f"{type(model).__name__} has no feature map to explain")
    method = check_method(method or DEFAULT_METHOD)
    was_training = model.training
    model.eval()
    parts = [
        explain_batch(model, x, tta, method) for x in eval_batches(images_uint8_nhwc, mean, std, device, batch_size)
    ]
    model.train(was_training)
    if not parts:
        return Explained(
            torch.empty(0, model.head.out_features), torch.empty(0, model.head.in_features), torch.empty(0)
        )
    return Explained(*(torch.cat([getattr(p, k).cpu() for p in parts]) for k in ("logits", "features", "maps")))


def resize_maps(maps, size):
    """(N, h, w) maps over the whole image -> (N, size, size), bilinear, still in [0, 1]."""
    maps = torch.as_tensor(maps, dtype=torch.float32)
    if maps.numel() == 0:
        return maps.reshape(0, size, size)
    return F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1)


def to_grid(one_map, size=GRID):
    """One (h, w) map -> a size x size list of rows of numbers in [0, 1], three decimals (the API's form)."""
    grid = resize_maps(torch.as_tensor(one_map)[None], size)[0]
    return [[round(float(v), 3) for v in row] for row in grid]


def explanation_json(prediction, one_map=None, method=DEFAULT_METHOD):
    """The API's `explanation` of one prediction: {"kind": "map", "method", "grid": GRID x GRID rows of 0-1 values
    over the whole image, top row first} for an image model; {"kind": "skeleton", "points": the hand's 21 [x, y]
    (fractions of the letterboxed square) or null} for a landmark model."""
    if one_map is not None:
        return {"kind": "map", "method": method, "grid": to_grid(one_map)}
    hand = prediction.hand or {}
    return {"kind": "skeleton", "points": hand.get("points") if hand.get("found") else None}
