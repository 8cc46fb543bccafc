"""Registry of architectures: a name -> a ModelSpec that builds the network and says what it can do.

Like timm's registry, each entry carries its pretrained configuration (whether weights ship, the input
mean/std they expect) and its capabilities (linear probe, how many blocks fine-tuning may train), so recipes
and the model-file checks ask the registry instead of knowing any architecture.

Every network built here implements one small interface:
    model(x) -> logits            model.features(x) -> (N, D) penultimate features
    model.head -> nn.Linear       model.freeze_for_fine_tuning(blocks) / model.unfreeze()
    image models also: model.feature_map(x) -> (N, C, h, w) last convolution's output,
    model.pool_features(map) -> (N, D), so that features(x) == pool_features(feature_map(x)), and
    model.map_layers() -> the layers that make the map, in order (explanations)
"""

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import FolderCNNError
from . import cnn, effnet, landmarks

MAX_IMAGE_SIZE = 1024  # a model file asking for more is refused (memory per image grows with its square)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable  # build(num_classes, **args, pretrained=False) -> nn.Module
    description: str
    args: dict = field(default_factory=dict)  # argument name -> check(value) raising ValueError if unusable
    min_image_size: int = 8
    pretrained: bool = False  # ImageNet weights ship with foldercnn's dependencies
    mean: tuple | None = None  # input normalisation the pretrained weights expect, in [0, 1] pixel units
    std: tuple | None = None
    linear_probe: bool = False  # frozen features + a linear head is a sensible recipe
    fine_tune_blocks: int = 0  # how many of its last blocks fine-tuning may unfreeze (0: not supported)
    input: str = "image"  # "image": pixels; "hand-landmarks": the 21 keypoints of a hand found in the image
    fit: str = "squash"  # how images are brought to the input size: "squash" or "letterbox" (keeps the shape)
    unfamiliarity: bool = True  # the distance of its features from the training images' says something
    sized_by_input: bool = False  # its layers depend on the input size: image_size is always one of its args
    explanation: str = "map"  # what shows where it looked: "map" (class activation map) or "skeleton" (landmarks)
    # peak activation bytes per input pixel in inference, so that batches fit a memory budget whatever image
    # size a model file asks for (benchmarks/hostile.py measures the peak)
    activation_bytes_per_pixel: int = 600

    def check_args(self, args):
        """Refuse unknown or out-of-range architecture arguments (from a recipe or a model file)."""
        if not isinstance(args, dict):
            raise FolderCNNError(f"{self.name}: architecture arguments must be an object, got {type(args).__name__}")
        unknown = sorted(set(args) - set(self.args))
        if unknown:
            raise FolderCNNError(
                f"{self.name} has no argument {', '.join(unknown)} (it takes: {', '.join(sorted(self.args)) or 'none'})"
            )
        for key, value in args.items():
            try:
                self.args[key](value)
            except (ValueError, TypeError) as e:
                raise FolderCNNError(f"{self.name}: bad {key}={value!r}: {e}") from None

    def check_image_size(self, size, what="--image-size"):
        if not isinstance(size, int) or isinstance(size, bool):
            raise FolderCNNError(f"{what} must be a whole number of pixels, got {size!r}")
        if not self.min_image_size <= size <= MAX_IMAGE_SIZE:
            raise FolderCNNError(
                f"{self.name} needs {what} between {self.min_image_size} and {MAX_IMAGE_SIZE}, got {size}"
            )


_SPECS: dict[str, "ModelSpec"] = {}


def register(spec):
    _SPECS[spec.name] = spec
    return spec


def available_models():
    return sorted(_SPECS)


def get_spec(name):
    if name not in _SPECS:
        raise FolderCNNError(f"unknown model '{name}' (available: {', '.join(available_models())})")
    return _SPECS[name]


def models_with(capability):
    """Names of the architectures with a capability ('pretrained', 'linear_probe', 'fine_tune_blocks')."""
    return [n for n in available_models() if getattr(_SPECS[n], capability)]


def create_model(name, num_classes, pretrained=False, **args):
    spec = get_spec(name)
    spec.check_args(args)
    if pretrained and not spec.pretrained:
        raise FolderCNNError(
            f"{name} has no pretrained weights (models with them: {', '.join(models_with('pretrained'))})"
        )
    return spec.build(num_classes, pretrained=pretrained, **args)


def _meta_model(name, num_classes, args):
    spec = get_spec(name)
    spec.check_args(args)
    with torch.device("meta"):
        return spec.build(num_classes, pretrained=False, **args)


def expected_tensors(name, num_classes, args):
    """{tensor name: (shape, dtype)} of an architecture's state dict, without allocating it (meta device)."""
    model = _meta_model(name, num_classes, args)
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def feature_dim(name, num_classes, args):
    """D of `model.features(x)` -> (N, D): the head's input width, read on the meta device."""
    return int(_meta_model(name, num_classes, args).head.in_features)


INFERENCE_BUDGET_BYTES = 256 << 20  # activations of one inference batch


def inference_batch(name, image_size, wanted=64):
    """The batch size that keeps one batch's activations within INFERENCE_BUDGET_BYTES (at least 1)."""
    per_image = int(image_size) ** 2 * get_spec(name).activation_bytes_per_pixel
    return max(1, min(wanted, INFERENCE_BUDGET_BYTES // per_image))


# ---- argument checks (a model file from someone else must not be able to ask for 360 GB) ----------------


def _probability(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError("must be a number in [0, 1)")


def _image_size_arg(value):
    if value is not None and (
        not isinstance(value, int) or isinstance(value, bool) or not 8 <= value <= MAX_IMAGE_SIZE
    ):
        raise ValueError(f"must be a whole number between 8 and {MAX_IMAGE_SIZE}")


def _tutorial_image_size(value):
    _image_size_arg(value)
    if value is None or cnn.tutorial_output_side(value) < 1:
        raise ValueError("tutorial-cnn needs an image size of at least 46")


def _widths(value):
    if (
        not isinstance(value, (list, tuple))
        or not 2 <= len(value) <= 8
        or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 2048 for w in value)
    ):
        raise ValueError("must be a list of 2 to 8 whole numbers between 1 and 2048")


register(
    ModelSpec(
        "tutorial-cnn",
        cnn.tutorial_cnn,
        "the Keras Rock-Paper-Scissors tutorial's CNN (3.5 M parameters at 150 px)",
        args={"image_size": _tutorial_image_size, "dropout": _probability},
        min_image_size=46,
        activation_bytes_per_pixel=700,
        sized_by_input=True,
    )
)
register(
    ModelSpec(
        "fast-cnn",
        cnn.fast_cnn,
        "small batch-norm CNN for CPU speed, any input size",
        args={"widths": _widths, "image_size": _image_size_arg, "dropout": _probability},
        min_image_size=8,
        activation_bytes_per_pixel=250,
    )
)
for _variant, _size in (("lite0", "4.7"), ("lite1", "5.4"), ("lite2", "6.1")):
    register(
        ModelSpec(
            f"effnet-{_variant}",
            functools.partial(effnet.effnet_lite, _variant),
            f"EfficientNet-{_variant.capitalize()} ({_size} M parameters with ImageNet's head), ImageNet weights",
            args={"dropout": _probability},
            min_image_size=32,
            pretrained=True,
            mean=effnet.INPUT_MEAN,
            std=effnet.INPUT_STD,
            linear_probe=True,
            fine_tune_blocks=len(effnet.block_list(_variant)),
            activation_bytes_per_pixel=900,
        )
    )
register(
    ModelSpec(
        "hand-landmarks",
        lambda num_classes, pretrained=False: landmarks.LandmarkNet(num_classes),
        "a linear head on features of the 21 landmarks MediaPipe Hands' models find (needs foldercnn[hands])",
        min_image_size=64,
        linear_probe=True,
        input="hand-landmarks",
        fit="letterbox",
        unfamiliarity=False,
        explanation="skeleton",
    )
)
