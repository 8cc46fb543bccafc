"""TrainOptions: one object of every run option; errors name options in Python and flags on the command line."""

import json
from dataclasses import FrozenInstanceError

import pytest

import foldercnn
from foldercnn.cli import flag_message
from foldercnn.data.augment import AugmentConfig
from foldercnn.errors import FolderCNNError, OptionError
from foldercnn.training.options import TrainOptions


def test_keyword_values_split_into_options_and_recipe_overrides():
    o = TrainOptions.of(seed=3, epochs=2, image_size=16, augment=False, val_fraction=None, time_budget=9.5)
    assert (o.seed, o.time_budget, o.val_fraction) == (3, 9.5, None)
    assert o.overrides == {"epochs": 2, "image_size": 16, "augment": False}
    recipe = o.make_recipe()
    assert recipe.epochs == 2 and recipe.image_size == 16 and recipe.augment == AugmentConfig()
    assert json.loads(json.dumps(o.to_dict())) == o.to_dict()  # what options.json and the model file hold
    with pytest.raises(FrozenInstanceError):
        o.seed = 4  # frozen: a run's options do not change under it


@pytest.mark.parametrize(
    "values, option",
    [
        ({"val_fraction": 2}, "val_fraction"),
        ({"split": "random"}, "split"),
        ({"resume": True}, "resume"),
        ({"time_budget": -1}, "time_budget"),
        ({"uncertain_below": 1.5}, "uncertain_below"),
        ({"val_dir": "v", "val_fraction": 0.3}, "val_fraction"),
        ({"refit": True, "val_dir": "v"}, "refit"),
        ({"refit": True, "time_budget": 60}, "refit"),
    ],
)
def test_a_bad_value_names_the_option_not_a_flag(values, option):
    with pytest.raises(OptionError) as e:
        TrainOptions.of(**values)
    assert e.value.option == option and str(e.value).startswith(option + " ") and "--" not in str(e.value)


def test_the_python_api_and_the_command_line_word_the_same_error(tmp_path, cli):
    with pytest.raises(FolderCNNError, match=r"^epochs must be at least 1"):
        foldercnn.train(tmp_path / "nowhere", tmp_path / "run", epochs=0)
    with pytest.raises(FolderCNNError, match="not both"):
        foldercnn.train(tmp_path / "nowhere", tmp_path / "run", TrainOptions(), seed=2)
    assert (
        flag_message(OptionError("val_fraction", "must be between 0 and 1")) == "--val-fraction must be between 0 and 1"
    )
    assert flag_message(OptionError("val_dir", "x")) == "--val x"
    assert flag_message(FolderCNNError("plain")) == "plain"


@pytest.mark.parametrize(
    "flags, recipe, fine_tune",
    [
        ([], "transfer", True),  # the recipe's own choice
        (["--no-fine-tune"], "transfer", False),
        ([], "probe", False),
        (["--fine-tune"], "probe", True),
    ],
)
def test_fine_tuning_is_the_recipes_choice_and_the_flag_overrides_it(flags, recipe, fine_tune):
    from foldercnn.cli import train_options
    from foldercnn.cli_parser import build_parser

    args = build_parser().parse_args(["train", "data", "--out", "run", "--recipe", recipe, *flags])
    options = train_options(args)
    assert options.make_recipe().fine_tune is fine_tune
    assert ("fine_tune" in options.overrides) is bool(flags)  # saved with the run only when given
