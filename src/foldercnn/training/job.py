"""The whole job: a labelled folder -> a run folder (model file, history, figures, report.html).

`train_folder` checks the options and starts the processes; `Job.run` is a short sequence of named steps:
prepare the data, build the model, train (strategy.py), calibrate and fit the unfamiliarity score (finish.py),
write the model file and the report. Everything the job does is told as events (events.py).
"""

import contextlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .. import run_folder as rf
from .. import runtime
from ..data.augment import augment_batch
from ..data.hands import draw_skeleton, find_hands
from ..errors import FolderCNNError, OptionError
from ..evaluation.report import write_report
from ..events import Events, console
from ..files import check_out_dir
from ..models import unfamiliar
from ..models.file import save_model
from ..models.registry import create_model, get_spec
from ..models.summary import count_parameters, summary
from ..plots import augmentation_preview, sample_grid, training_curves
from . import checkpoint as ckpt
from . import distributed
from .finish import (
    calibrate,
    describe_calibration,
    final_pass,
    fit_unfamiliarity,
    kept_or_final_pass,
    model_metadata,
    unfamiliarity_sample,
)
from .loop import fit
from .options import TrainOptions
from .prepare import prepare_data
from .recipes import check_recipe
from .run import RunContext, RunWriter, save_options
from .strategy import run_training


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    history: list
    best_epoch: int
    classes: list
    recipe: object
    interrupted: bool
    n_train: int
    n_val: int
    skipped: list
    seconds: dict
    fine_tuned_epochs: int = 0
    main_process: bool = True  # False on the other ranks of a torchrun launch: they wrote and printed nothing
    refit_history: list = field(default_factory=list)  # the refit's epochs (history stays the split's)


@dataclass
class FirstModel:
    """What the split's model says of the held-out images it never trained on (before a refit replaces it)."""

    val_logits: torch.Tensor
    val_labels: torch.Tensor
    unfamiliarity: object  # models/unfamiliar.Unfamiliarity fitted with this model, or None
    sample_features: torch.Tensor | None  # its features of the training images the score was fitted on


def train_folder(data_dir, out_dir, options=None, *, log=print, on_event=None, **values):
    """Train a classifier on DATA_DIR and write the run folder OUT_DIR. Returns a TrainResult.

    options: a TrainOptions, or its values as keywords (`seed=1, time_budget=60, epochs=3`: names that are not
    options override the recipe's fields). log: where the console's lines go; on_event: called with every event
    (events.py). Process-wide speed settings (threads, allocator) are the caller's: `foldercnn.runtime.setup()`.
    Launched by torchrun (WORLD_SIZE > 1), the processes train one model together (distributed.py): rank 0
    alone writes the run folder and tells events; every rank returns when it is written.
    """
    t0 = time.perf_counter()
    events = Events(console(log), on_event)
    with reported(events):
        if options is not None and values:
            raise FolderCNNError(f"give a TrainOptions or keyword values, not both (got {', '.join(values)} too)")
        options = options or TrainOptions.of(**values)
        recipe = options.make_recipe()
        check_recipe(recipe)
        if options.refit and recipe.linear_probe:
            raise OptionError(
                "refit", f"is for recipes trained by the loop (fast, seed); recipe '{recipe.name}' fits a linear probe"
            )
        distributed.check_world(recipe, distributed.launched_world_size())
        check_out_dir(out_dir, [data_dir, options.val_dir])
        ranks, device = distributed.start(runtime.choose_device(options.device))
        try:
            run = RunContext(
                device,
                runtime.resolve_precision(options.precision, device),
                options.seed,
                events if ranks.is_main else Events(),
                ranks=ranks,
            )
            return Job(Path(data_dir), Path(out_dir), options, recipe, run).run(t0)
        finally:
            ranks.stop()


@contextlib.contextmanager
def reported(events):
    """A run that stops on an error tells it as an "error" event before the error goes on to the caller."""
    try:
        yield
    except (FolderCNNError, OSError) as e:
        events.emit("error", message=str(e))
        raise


class Job:
    """One training run, once its options are checked and its processes (one, or torchrun's) are joined."""

    def __init__(self, data_dir, out_dir, options, recipe, ctx):
        self.data_dir, self.out_dir, self.options, self.recipe, self.ctx = data_dir, out_dir, options, recipe, ctx
        self.events, self.is_main = ctx.events, ctx.ranks.is_main
        self.fine_tuned_epochs, self.skipped, self.seconds, self.model_summary = 0, [], {}, None
        self.refit_summary = None  # what the refit did, for the model file; None: no refit
        self.everything = None  # with a refit: the split's two sides together, what the refit trained on

    def run(self, t0):
        """The steps of a run, in order; returns the TrainResult."""
        self.events.emit("start", options=self.options.to_dict(), out_dir=str(self.out_dir))
        # about a second is kept back for saving the model and drawing the curves
        deadline = None if self.options.time_budget is None else t0 + self.options.time_budget - 1.0
        self.events.stage("data", 0.0, "decoding the images and holding some out")
        with self.ctx.ranks.local_main_first():  # one process per machine fills the decode cache, the others read it
            train, val, self.skipped = prepare_data(self.data_dir, self.recipe, self.options, self.events)
        self.seconds["data"] = time.perf_counter() - t0
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_options(self.out_dir, self.options.to_dict())
        self.ctx = self.ctx.but(writer=self.writer(train, val), deadline=deadline)
        self.ctx = self.ctx.but(resume=self.ctx.writer.resume_point(self.options.resume, self.events))
        if self.ctx.resume is not None and deadline is not None:  # the budget counts the time already spent
            self.ctx = self.ctx.but(deadline=deadline - self.ctx.resume[0]["seconds_spent"])
        model = self.build_model(len(train.classes))
        if self.is_main:
            draw_previews(self.out_dir, self.data_dir, train, self.recipe, self.options.seed)
        result = self.train(model, train, val)
        first, refitted = None, None
        if self.options.refit:
            first = self.first_model(model, train, val) if self.is_main else None
            refitted = self.refit(model, train, val, result)
        if not self.is_main:  # rank 0 evaluates, calibrates and writes; wait until the run folder is complete
            self.ctx.ranks.barrier()
            return self.result(result, train, val, main_process=False, refitted=refitted)
        model_path = self.finish(model, train, val, result, first if self.refit_summary else None)
        self.ctx.ranks.barrier()
        return self.result(result, train, val, model_path=model_path, refitted=refitted)

    def writer(self, train, val):
        """The run writer, with what identifies this run's data, split and recipe for a later resume."""
        files = ckpt.data_files(train, val)
        identity = self.options.identity(
            self.recipe, ckpt.fingerprint(files, [len(train), len(val)]), self.ctx.precision
        )
        return RunWriter(self.out_dir, identity, files, writes=self.is_main)

    def build_model(self, num_classes):
        recipe, ctx = self.recipe, self.ctx
        torch.manual_seed(self.options.seed)
        model = create_model(recipe.model, num_classes, pretrained=recipe.pretrained, **recipe.model_args)
        self.events(f"recipe '{recipe.name}': {recipe.description}")
        self.events(
            f"model {recipe.model} at {recipe.image_size}x{recipe.image_size}, {count_parameters(model):,} "
            f"parameters, {ctx.device.type} {ctx.precision}, {torch.get_num_threads()} threads"
            + (
                f" in each of {ctx.ranks.world} processes ({recipe.batch_size // ctx.ranks.world} images of "
                f"every batch of {recipe.batch_size} each)"
                if ctx.ranks.world > 1
                else ""
            )
        )
        self.model_summary = summary(model, recipe.image_size)  # logged now, and shown by the report
        self.events.emit("model", name=recipe.model, parameters=count_parameters(model), summary=self.model_summary)
        return model

    def train(self, model, train, val):
        """The recipe's training (strategy.py); the model is left with the best weights."""
        if self.ctx.deadline is not None:
            self.events(
                f"time budget: {self.options.time_budget:g} s in all, "
                f"{self.ctx.deadline - time.perf_counter():.1f} s left for training"
            )
        self.events.stage("training", 0.2, "training")
        t1 = time.perf_counter()
        result, self.fine_tuned_epochs = run_training(
            model,
            train,
            val,
            self.recipe,
            self.ctx.but(events=self.events.span(0.2, 0.45 if self.options.refit else 0.7)),
        )
        self.seconds["train"] = time.perf_counter() - t1
        if result.best_state is None:
            raise FolderCNNError("stopped before the first epoch finished; no model saved")
        model.load_state_dict(result.best_state)
        return result

    def first_model(self, model, train, val):
        """The split's model on its held-out images and its unfamiliarity score, kept for the refitted model's file:
        the refitted model trains on those images, so it cannot be calibrated on them."""
        val_logits, val_features, answered = final_pass(model, val, self.recipe, self.ctx.device)
        val_labels = val.labels[answered]
        fitted, sample_features = None, None
        if get_spec(self.recipe.model).unfamiliarity:
            sample = unfamiliarity_sample(train, self.options.seed, self.events)
            _, sample_features, _ = final_pass(model, sample, self.recipe, self.ctx.device)
            fitted = fit_unfamiliarity(
                sample_features, sample.labels, val_features[answered], val_labels, len(train.classes), self.events
            )
        return FirstModel(val_logits[answered], val_labels, fitted, sample_features)

    def refit(self, model, train, val, split_fit):
        """A fresh model (the same initial weights) trained on the whole folder for the epochs the split chose;
        `model` is left with its weights. Returns the refit's FitResult; an interrupted refit keeps the first model."""
        everything = self.everything = train.union(val)
        recipe = replace(self.recipe, epochs=split_fit.best_epoch, keep="last")
        self.events(
            f"refit: a fresh model on all {len(everything)} images for {recipe.epochs} epochs (the split's choice); "
            "its validation figures below are of images it trains on"
        )
        self.events.stage("refit", 0.45, "training again on the whole folder")
        t1 = time.perf_counter()
        torch.manual_seed(self.options.seed)
        fresh = create_model(recipe.model, len(train.classes), pretrained=recipe.pretrained, **recipe.model_args)
        # no checkpoint of its own: a run killed here resumes the split's last one, then refits again
        run = self.ctx.but(events=self.events.span(0.45, 0.7), writer=RunWriter(), resume=None)
        refitted = fit(fresh, everything, val, recipe, run)
        self.seconds["refit"] = time.perf_counter() - t1
        if refitted.interrupted or len(refitted.history) < recipe.epochs:
            self.events("refit interrupted: keeping the model trained on the split")
            return refitted
        model.load_state_dict(refitted.best_state)
        self.refit_summary = {
            "epochs": recipe.epochs,
            "n_train": len(everything),
            "images_seen": sum(h["images"] for h in refitted.history),
            "seconds": self.seconds["refit"],
            "first_model": {"n_train": len(train), "n_val": len(val), "best_epoch": split_fit.best_epoch},
        }
        return refitted

    def finish(self, model, train, val, result, first=None):
        """Calibrate, fit the unfamiliarity score, write the model file, history, curves and report. first: the
        split's model's scores (FirstModel) when `model` was refitted on the whole folder."""
        if first is None:
            val_logits, val_features, answered = kept_or_final_pass(
                model, val, self.recipe, self.ctx.device, result.frozen, "val"
            )
            val_logits, val_features, val_labels = val_logits[answered], val_features[answered], val.labels[answered]
        else:  # the temperature of the model that never saw these images, as cross-fitted calibration does
            val_logits, val_features, val_labels = first.val_logits, None, first.val_labels
        if self.fine_tuned_epochs and self.recipe.wise_ft:
            self.events(
                f"validation accuracy of the ensembled weights: "
                f"{(val_logits.argmax(1) == val_labels).float().mean().item():.4f}"
            )
        self.events.stage("calibration", 0.7, "calibrating")
        calibration = calibrate(val_logits, val_labels, self.options.uncertain_below)
        if first is not None:
            calibration["fitted_on"] += ", scored by the model trained without them before the refit"
        self.events(describe_calibration(calibration))
        self.events.stage("unfamiliarity", 0.8, "fitting the unfamiliarity score")
        if first is None:
            unfamiliarity = self.unfamiliarity(model, train, val_features, val_labels, result.frozen)
        else:
            unfamiliarity = self.refitted_unfamiliarity(model, self.everything, first)
        self.events.stage("report", 0.9, "writing the model file and the report")
        timing = {"data_seconds": self.seconds["data"], "train_seconds": self.seconds["train"]}
        model_path = save_model(
            self.out_dir / rf.MODEL, model, model_metadata(self, train, val, result, calibration, timing), unfamiliarity
        )
        rf.write_history(self.out_dir / rf.HISTORY, result.history)
        training_curves(
            result.history,
            self.out_dir / rf.CURVES,
            title=f"{self.recipe.name} recipe: {len(train)} training images, {len(val)} validation",
        )
        self.events(f"report: {write_report(self.out_dir, model_summary=self.model_summary)}")
        if not result.interrupted:
            self.ctx.writer.finished()
        best = result.history[result.best_epoch - 1]
        self.events.emit(
            "done",
            model=str(model_path),
            best_epoch=result.best_epoch,
            val_accuracy=best["val_accuracy"],
            interrupted=result.interrupted,
            progress=1.0,
        )
        return model_path

    def unfamiliarity(self, model, train, val_features, val_labels, frozen=None):
        if not get_spec(self.recipe.model).unfamiliarity:  # benchmarks/README.md: landmark distances told nothing
            self.events("unfamiliarity: a photo without a hand found is what this model calls unfamiliar")
            return None
        sample = unfamiliarity_sample(train, self.options.seed, self.events)
        _, sample_features, sample_answered = kept_or_final_pass(
            model, sample, self.recipe, self.ctx.device, frozen, "train" if sample is train else None
        )
        return fit_unfamiliarity(
            sample_features[sample_answered],
            sample.labels[sample_answered],
            val_features,
            val_labels,
            len(train.classes),
            self.events,
        )

    def refitted_unfamiliarity(self, model, everything, first):
        """The refitted model's score: its Gaussians on its own training features, the first model's held-out
        threshold carried over as a multiple of training scores (models/unfamiliar.py, refitted)."""
        if first.unfamiliarity is None:
            return None
        sample = unfamiliarity_sample(everything, self.options.seed, self.events)
        _, features, _ = final_pass(model, sample, self.recipe, self.ctx.device)
        try:
            fitted = unfamiliar.refitted(
                first.unfamiliarity, first.sample_features, features, sample.labels, len(everything.classes)
            )
        except ValueError as e:
            self.events(f"no unfamiliarity score: {e}")
            return None
        self.events(f"unfamiliarity: threshold {fitted.threshold:.4g} ({fitted.rule})")
        return fitted

    def result(self, fitted, train, val, model_path=None, main_process=True, refitted=None):
        return TrainResult(
            self.out_dir,
            model_path or self.out_dir / rf.MODEL,
            fitted.history,
            fitted.best_epoch,
            train.classes,
            self.recipe,
            fitted.interrupted,
            len(train),
            len(val),
            self.skipped,
            dict(self.seconds),
            self.fine_tuned_epochs,
            main_process,
            refitted.history if refitted is not None and self.refit_summary else [],
        )


def draw_previews(out_dir, data_dir, train, recipe, seed):
    """augmentations.png (one image per class, augmented) and samples.png (six per class)."""
    preview_idx = [
        int((train.labels == c).nonzero()[0]) for c in range(len(train.classes)) if (train.labels == c).any()
    ][:4]
    described = ", ".join(f"{k}={v}" for k, v in recipe.augment.to_dict().items() if v)
    augmentation_preview(
        train.take(torch.tensor(preview_idx)),
        lambda x, g: augment_batch(x, recipe.augment, g),
        described,
        out_dir / rf.AUGMENTATIONS,
        seed=seed,
    )
    shown = torch.cat(
        [
            (train.labels == c).nonzero().flatten()[:: max(1, int((train.labels == c).sum()) // 6)][:6]
            for c in range(len(train.classes))
        ]
    )  # six spread-out images per class, not a copy of all
    images, what = train.take(shown), "as the model sees them"
    if get_spec(recipe.model).input == "hand-landmarks":  # the landmarks found are what the model sees
        found = find_hands(images.numpy(), pool_from=1)  # in a child: this process loads no hand finder
        images = torch.from_numpy(np.stack([draw_skeleton(im, found.hand(i)) for i, im in enumerate(images.numpy())]))
        what = "with the hand landmarks found"
    sample_grid(
        images,
        train.labels[shown],
        train.classes,
        out_dir / rf.SAMPLES,
        title=f"{Path(data_dir).name}: training images per class ({recipe.image_size} px, {what})",
    )
