"""TrainOptions: every option of a training run, with its default and meaning, in one frozen object.

The run saves it (RUN_DIR/options.json, the model file's "options"); the checkpoint's resume identity and the
report are derived from it. Only the command line speaks flags: errors here name options as Python spells them.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import OptionError
from ..models.prediction import DEFAULT_UNCERTAIN_BELOW
from .recipes import Recipe, get_recipe

SPLITS = ("groups", "images")
RESUMES = ("auto", "require", "ignore", "force")
PRECISIONS = ("auto", "bf16", "fp32")
DEFAULT_VAL_FRACTION = 0.2


@dataclass(frozen=True)
class TrainOptions:
    recipe: str = "fast"  # a recipe name (`foldercnn models` lists them)
    overrides: dict = field(default_factory=dict)  # recipe fields to change (epochs, image_size, lr, model, ...)
    val_dir: str | None = None  # a validation folder with the same classes; None: hold some of the data out
    val_fraction: float | None = None  # the share held out when there is no val_dir (None: 0.2)
    split: str = "groups"  # groups: near-duplicates stay on one side of the split; images: image by image
    seed: int = 0  # makes the run repeatable: split, initial weights, batch order, augmentation
    precision: str = "auto"  # auto: bf16 where the CPU computes it natively, else fp32
    device: str = "auto"  # auto: the CUDA GPU when PyTorch sees one, else the CPU
    time_budget: float | None = None  # seconds of wall clock for the whole run; epochs then follow the clock
    refit: bool = False  # after the split chose the epochs, train a fresh model on the whole folder for that many
    uncertain_below: float = DEFAULT_UNCERTAIN_BELOW  # answers below this calibrated probability are uncertain
    resume: str = "auto"  # auto: continue an interrupted run found in the run folder; require, ignore, force

    def __post_init__(self) -> None:
        self.check()

    @classmethod
    def of(cls, **values: Any) -> "TrainOptions":
        """Options from keyword values: option names are options, any other name (epochs=3, augment=False,
        fine_tune=False, probe_views=1, ...) overrides the recipe's field; None values are left at their defaults."""
        names = {f.name for f in fields(cls)}
        given = {k: v for k, v in values.items() if v is not None}
        overrides = {**given.pop("overrides", {}), **{k: given.pop(k) for k in list(given) if k not in names}}
        if "val_dir" in given:
            given["val_dir"] = str(given["val_dir"])
        return cls(overrides=overrides, **given)

    def check(self) -> None:
        if self.split not in SPLITS:
            raise OptionError("split", f"must be one of {', '.join(SPLITS)}, got '{self.split}'")
        if self.resume not in RESUMES:
            raise OptionError("resume", f"must be one of {', '.join(RESUMES)}, got {self.resume!r}")
        if self.precision not in PRECISIONS:
            raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.val_dir is not None and self.val_fraction is not None:
            raise OptionError("val_fraction", "cannot be given with val_dir (a validation folder); give one of them")
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise OptionError("val_fraction", f"must be between 0 and 1, got {self.val_fraction}")
        if self.refit and self.val_dir is not None:
            raise OptionError(
                "refit", "trains again on the images a split held out; a validation folder holds none out"
            )
        if self.refit and self.time_budget is not None:
            raise OptionError("refit", "cannot be combined with a time budget (its epochs are the split's choice)")
        if self.time_budget is not None and not self.time_budget > 0:
            raise OptionError("time_budget", f"must be positive, got {self.time_budget}")
        if not 0.0 <= self.uncertain_below <= 1.0:
            raise OptionError("uncertain_below", f"must be between 0 and 1, got {self.uncertain_below}")

    def make_recipe(self) -> Recipe:
        return get_recipe(self.recipe, **self.overrides)

    @property
    def held_out(self) -> float:
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_plain))

    def identity(self, recipe: Recipe, data: str, precision: str) -> dict:
        """What a checkpoint must share with this run to be continued: data, recipe, seed, precision, ..."""
        return json.loads(
            json.dumps(
                {
                    "data": data,
                    "recipe": recipe.to_dict(),
                    "seed": self.seed,
                    "precision": precision,
                    "refit": self.refit,
                    "split": self.split,
                },
                default=_plain,
            )
        )


def _plain(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if to_dict else str(value)
