"""Named training recipes: everything that decides how a model is trained, in one place."""

from dataclasses import asdict, dataclass, field, replace

from ..data import hands
from ..data.augment import AugmentConfig
from ..errors import FolderCNNError, OptionError
from ..models.registry import get_spec, models_with

TUTORIAL_AUGMENT = AugmentConfig(
    rotation=40, width_shift=0.2, height_shift=0.2, shear=0.2, zoom=0.2, horizontal_flip=True
)


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str
    image_size: int
    batch_size: int
    epochs: int
    steps_per_epoch: int = 0  # 0: one pass over the training images per epoch
    optimizer: str = "rmsprop"  # rmsprop | sgd | adamw
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"  # constant | onecycle
    label_smoothing: float = 0.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model_args: dict = field(default_factory=dict)
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: none
    tta: bool = False  # evaluate and predict on the image and its mirror image, averaged
    pretrained: bool = False  # start from the architecture's pretrained weights
    linear_probe: bool = False  # fit only the classifier, on features computed once
    probe_views: int = 0  # > 0: the probe also sees this many augmented views of each image
    fine_tune: bool = False  # after the linear probe, train the last fine_tune_blocks blocks for `epochs`
    fine_tune_blocks: int = 0  # with fine_tune: how many of the last blocks to train
    wise_ft: float = 0.0  # with fine_tune: keep (1 - w) x probe + w x fine-tuned weights (WiSE-FT); 0: off
    start_size: int = 0  # > 0: training batches start at this side and grow to image_size (see loop.train_side)
    keep: str = "best"  # best: the epoch with the best validation score; last: the final epoch
    mean: tuple = (0.0, 0.0, 0.0)  # input normalisation; a pretrained model's own replaces it (see get_recipe)
    std: tuple = (1.0, 1.0, 1.0)
    description: str = ""

    def to_dict(self):
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d


# Pretrained EfficientNet-Lite0 (ImageNet): a linear head fitted on its frozen features, then its last 4
# blocks fine-tuned for 2 epochs, at 112 px: the best test accuracy a minute buys (benchmarks/transfer.py).
TRANSFER = Recipe(
    name="transfer",
    model="effnet-lite0",
    image_size=112,
    batch_size=32,
    epochs=2,
    optimizer="adamw",
    lr=3e-4,
    weight_decay=1e-4,
    schedule="onecycle",
    label_smoothing=0.1,
    augment=AugmentConfig(rotation=10, width_shift=0.1, height_shift=0.1, zoom=0.1, horizontal_flip=True),
    pretrained=True,
    linear_probe=True,
    fine_tune=True,
    fine_tune_blocks=4,
    keep="best",
    description="pretrained EfficientNet-Lite0 at 112 px: linear probe, then its last 4 blocks fine-tuned",
)


RECIPES = {
    # The Keras tutorial, exactly: its CNN at 150 px, RMSprop 1e-3 (rho 0.9, eps 1e-7), batch 126,
    # 25 epochs of 20 steps, Keras ImageDataGenerator augmentation, final epoch's weights kept.
    "seed": Recipe(
        name="seed",
        model="tutorial-cnn",
        image_size=150,
        batch_size=126,
        epochs=25,
        steps_per_epoch=20,
        optimizer="rmsprop",
        lr=1e-3,
        augment=TUTORIAL_AUGMENT,
        model_args={"image_size": 150},
        keep="last",
        description="the Keras Rock-Paper-Scissors tutorial, exactly (slow on a CPU)",
    ),
    # A small batch-norm CNN at 96 px, its training batches growing from 48 px: fast on a CPU
    # (benchmarks/time_to_accuracy.py: time and test accuracy).
    "fast": Recipe(
        name="fast",
        model="fast-cnn",
        image_size=96,
        batch_size=64,
        epochs=12,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        augment=AugmentConfig(
            rotation=15,
            width_shift=0.1,
            height_shift=0.1,
            zoom=0.1,
            horizontal_flip=True,
            brightness=0.2,
            contrast=0.2,
            saturation=1.0,
        ),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        start_size=48,
        keep="best",
        description="small batch-norm CNN at 96 px (trained from 48 px up), one-cycle SGD, 12 epochs (default)",
    ),
    "transfer": TRANSFER,
    # Pretrained EfficientNet-Lite0 at 224 px, frozen; a linear head fitted on its features, which depend on each
    # image alone, so they can be kept per image (teach's warm worker). With --fine-tune, the last blocks then
    # train for 3 epochs as transfer's do.
    "probe": replace(
        TRANSFER,
        name="probe",
        image_size=224,
        epochs=3,
        fine_tune=False,
        description="pretrained EfficientNet-Lite0 at 224 px, linear probe on cached features",
    ),
    # For photos that will be used in other settings than they were taken in (other rooms, cameras, light):
    # the transfer recipe's pretrained backbone, its head fitted on several randomly augmented views of every
    # image: any rotation (a hand is a hand at any angle: not for classes that depend on orientation), wider
    # zoom, colour and capture effects, and plain backgrounds replaced by photos and textures.
    # EfficientNet-Lite2: its frozen features beat Lite0's and a fine-tuned Lite0 on real photos
    # (benchmarks/real_photos.py; figures in benchmarks/README.md, "Real photos").
    "robust": Recipe(
        name="robust",
        model="effnet-lite2",
        image_size=160,
        batch_size=32,
        epochs=2,
        optimizer="adamw",
        lr=3e-4,
        weight_decay=1e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        augment=AugmentConfig(
            rotation=180,
            width_shift=0.1,
            height_shift=0.1,
            zoom=0.3,
            horizontal_flip=True,
            brightness=0.3,
            contrast=0.3,
            saturation=0.5,
            backgrounds=0.8,
            colour_cast=0.2,
            grey=0.2,
            low_res=0.3,
            noise=0.05,
        ),
        pretrained=True,
        linear_probe=True,
        probe_views=2,
        fine_tune_blocks=4,
        wise_ft=0.5,
        keep="best",
        description="for photos used elsewhere than taken: pretrained EfficientNet-Lite2, "
        "probe on augmented views (new backgrounds, any rotation, capture effects)",
    ),
    # For classes that are hand gestures: MediaPipe Hands (trained on real hands) turns each image into 21
    # keypoints, and a linear head is fitted on features of them that ignore background, light, skin and camera.
    # The training images are decoded at 256 px (the landmark model looks at a 224 px crop); images where no
    # hand is found are left out of training and answered "no hand found". benchmarks/real_photos.py measures it.
    "hands": Recipe(
        name="hands",
        model="hand-landmarks",
        image_size=256,
        batch_size=64,
        epochs=1,
        label_smoothing=0.0,
        linear_probe=True,
        probe_views=2,
        keep="best",
        description="for hand gestures: a head on hand landmarks (MediaPipe Hands); real photos like the training "
        "renders",
    ),
}


def get_recipe(name, **overrides):
    """A named recipe with command-line overrides (None values are ignored), checked against what its model
    can do: every combination that cannot work is refused here with the valid choices."""
    if name not in RECIPES:
        raise FolderCNNError(f"unknown recipe '{name}' (available: {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("augment") is False:  # --no-augment: the images exactly as they are
        overrides["augment"] = AugmentConfig()
    for key in ("epochs", "batch_size", "image_size"):
        if key in overrides and overrides[key] < 1:
            raise OptionError(key, f"must be at least 1, got {overrides[key]}")
    if "lr" in overrides and not overrides["lr"] > 0:
        raise OptionError("lr", f"must be positive, got {overrides['lr']}")
    if "model" in overrides and overrides["model"] != recipe.model:
        recipe = replace(recipe, model_args={})
    recipe = replace(recipe, **overrides)
    spec = get_spec(recipe.model)
    if "start_size" not in overrides and (recipe.start_size > recipe.image_size or spec.sized_by_input):
        recipe = replace(recipe, start_size=0)  # a smaller --image-size, or a --model that cannot grow: no growth
    if "image_size" in spec.args and (spec.sized_by_input or "image_size" in recipe.model_args):
        recipe = replace(recipe, model_args={**recipe.model_args, "image_size": recipe.image_size})
    check_recipe(recipe)
    if recipe.pretrained:  # pretrained weights expect their own input normalisation
        recipe = replace(recipe, mean=tuple(spec.mean), std=tuple(spec.std))
    return recipe


def check_recipe(recipe):
    spec = get_spec(recipe.model)
    if spec.input == "hand-landmarks":
        if not recipe.linear_probe:
            raise FolderCNNError(
                f"{recipe.model} classifies hand landmarks: it is fitted as a head on them "
                f"(--recipe hands), not trained on pixels by recipe '{recipe.name}'"
            )
        hands.require()  # says how to install the hand finder's runtime when it is missing
    if recipe.pretrained and not spec.pretrained:
        raise FolderCNNError(
            f"recipe '{recipe.name}' starts from pretrained weights; {recipe.model} has none "
            f"(use --model {' or '.join(models_with('pretrained'))}, or another --recipe)"
        )
    if recipe.linear_probe and not spec.linear_probe:
        raise FolderCNNError(
            f"recipe '{recipe.name}' fits a linear probe; {recipe.model} does not support one "
            f"(use --model {' or '.join(models_with('linear_probe'))})"
        )
    if recipe.fine_tune and not recipe.linear_probe:
        raise OptionError(
            "fine_tune",
            f"follows a linear probe; recipe '{recipe.name}' has none "
            f"(recipes with one: {', '.join(n for n, r in RECIPES.items() if r.linear_probe)})",
        )
    if recipe.fine_tune and not 1 <= recipe.fine_tune_blocks <= spec.fine_tune_blocks:
        raise FolderCNNError(
            f"{recipe.model} can fine-tune 1 to {spec.fine_tune_blocks} blocks, not {recipe.fine_tune_blocks}"
        )
    spec.check_image_size(recipe.image_size)
    if recipe.start_size:
        check_start_size(recipe, spec)
    spec.check_args(recipe.model_args)


def check_start_size(recipe, spec):
    """Progressive resizing needs a network that works at any input size, and a start no larger than the end."""
    if spec.sized_by_input:
        raise OptionError(
            "start_size", f"needs a model that works at any input size; {recipe.model}'s layers depend on it"
        )
    spec.check_image_size(recipe.start_size, "start_size")
    if recipe.start_size > recipe.image_size:
        raise OptionError("start_size", f"must not exceed image_size ({recipe.image_size}), got {recipe.start_size}")


def describe_recipes():
    """One line per recipe, for help texts and `foldercnn models`."""
    return [f"{name}: {r.description} [{r.model}, {r.image_size} px, {r.epochs} epochs]" for name, r in RECIPES.items()]
