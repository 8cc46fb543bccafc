"""After training: the final pass over the validation (and training) images, the temperature, the unfamiliarity
score, and the model file's metadata."""

import numpy as np
import torch

from ..data.folders import stratified_split
from ..data.hands import describe_finder
from ..evaluation.calibration import choose_temperature
from ..evaluation.metrics import calibration_summary
from ..models import unfamiliar
from ..models.inference import batched_logits, hand_pass, takes_hands
from ..models.preprocess import default_preprocessing
from ..models.registry import get_spec
from .prepare import data_summary
from .transfer import tail_pass

FINAL_PASS_CHUNK = 1024  # images copied out of the (memory-mapped) decoded set at a time
# Above this many training images the unfamiliarity score is fitted on a stratified sample of that many
# (benchmarks/README.md, "Scale": the final pass at 80,640 images took four times the training's steps).
UNFAMILIARITY_FIT_MAX = 10_000


def final_pass(model, data, recipe, device):
    """(logits, features, rows with an answer) of the trained model on decoded images; see image_pass. A landmark
    model answers only the images in which a hand is found."""
    if takes_hands(model):
        parts = [
            hand_pass(model, data.take(slice(k, k + FINAL_PASS_CHUNK))) for k in range(0, len(data), FINAL_PASS_CHUNK)
        ]
        return (
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            torch.from_numpy(np.concatenate([p[2].found for p in parts])),
        )
    logits, features = image_pass(model, data, recipe, device)
    return logits, features, torch.ones(len(logits), dtype=torch.bool)


def kept_or_final_pass(model, data, recipe, device, frozen=None, which=None):
    """final_pass; or, where the outputs of the layers that stayed frozen were kept for these images (which:
    "train" or "val" of a transfer.FrozenOutputs) in float32 and no test-time augmentation is asked, the same
    pass over the trained layers alone."""
    kept = None if frozen is None or which is None else getattr(frozen, which)
    if kept is None or frozen.precision != "fp32" or recipe.tta:
        return final_pass(model, data, recipe, device)
    logits, features = tail_pass(model, frozen, which, device)
    return logits, features, torch.ones(len(logits), dtype=torch.bool)


def image_pass(model, data, recipe, device):
    """(logits, penultimate features) of the trained model on decoded images: eval mode, fp32, no augmentation,
    the batched inference path that prediction uses; chunk by chunk, so a memory-mapped training set larger than
    RAM is never copied whole (benchmarks/scale.py)."""
    parts = [
        batched_logits(
            model,
            data.take(slice(k, k + FINAL_PASS_CHUNK)),
            recipe.mean,
            recipe.std,
            device,
            recipe.tta,
            batch_size=64,
            features=True,
        )
        for k in range(0, len(data), FINAL_PASS_CHUNK)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def calibrate(logits, labels, uncertain_below):
    """Fit the softmax temperature on the validation split's logits (never a test folder's) for the model file."""
    t, rule = choose_temperature(logits, labels)
    cal = calibration_summary(logits, labels, t)
    before, after = cal["uncalibrated"], cal["calibrated"]
    return {
        "temperature": t,
        "uncertain_below": uncertain_below,
        "rule": rule,
        "fitted_on": f"validation split ({len(labels)} images)",
        "val_errors": int((logits.argmax(1) != labels).sum()),
        "val_nll_before": before["nll"],
        "val_nll_after": after["nll"],
        "val_ece_before": before["ece"],
        "val_ece_after": after["ece"],
    }


def describe_calibration(calibration):
    c = calibration
    return (
        f"calibration on the validation split: temperature {c['temperature']:.3f} ({c['rule']}), NLL "
        f"{c['val_nll_before']:.4f} -> {c['val_nll_after']:.4f}, expected calibration error "
        f"{c['val_ece_before']:.4f} -> {c['val_ece_after']:.4f}"
    )


def unfamiliarity_sample(train, seed, log=print, limit=UNFAMILIARITY_FIT_MAX):
    """The training images the unfamiliarity score is fitted on: all of them, or a seeded stratified sample of
    `limit` (in folder order, so the memory-mapped cache is read forward)."""
    if len(train) <= limit:
        return train
    _, keep = stratified_split(train.labels, limit / len(train), seed)
    log(f"unfamiliarity: fitted on a stratified sample of {len(keep):,} of the {len(train):,} training images")
    return train.subset(keep)


def fit_unfamiliarity(train_features, train_labels, val_features, val_labels, num_classes, log=print):
    """The unfamiliarity score (models/unfamiliar.py) on the training split's penultimate features, its
    threshold on the validation split's only; None when no usable one comes out."""
    try:
        fitted = unfamiliar.fit(train_features, train_labels, val_features, val_labels, num_classes=num_classes)
    except ValueError as e:
        log(f"no unfamiliarity score: {e}")
        return None
    if not fitted.threshold < float("inf"):
        log("no unfamiliarity score: the validation split gave no usable threshold")
        return None
    log(
        f"unfamiliarity: Mahalanobis distance on {fitted.feature_dim}-d features (rank {fitted.rank}), "
        f"threshold {fitted.threshold:.4g} ({fitted.rule})"
    )
    return fitted


def model_metadata(job, train, val, result, calibration, timing):
    """The model file's metadata (models/file.py validates it): job is the training Job (options, recipe,
    precision, data folder, skipped files, fine-tuning epochs)."""
    recipe, options, best = job.recipe, job.options, result.history[result.best_epoch - 1]
    spec = get_spec(recipe.model)
    return {
        "architecture": recipe.model,
        "arch_args": recipe.model_args,
        "classes": train.classes,
        "image_size": recipe.image_size,
        "preprocessing": default_preprocessing(
            recipe.mean, recipe.std, spec.fit, describe_finder() if spec.input != "image" else None
        ),
        "recipe": recipe.to_dict(),
        "options": options.to_dict(),
        "seed": options.seed,
        "precision": job.ctx.precision,
        "tta": recipe.tta,
        "fine_tuned": bool(recipe.fine_tune and job.fine_tuned_epochs > 0),
        "fine_tuned_epochs": job.fine_tuned_epochs,
        "calibration": calibration,
        "metrics": {
            "epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "val_accuracy": best["val_accuracy"],
            "val_loss": best["val_loss"],
            "train_accuracy": best["accuracy"],
            "train_loss": best["loss"],
            "n_train": len(train),
            "n_val": len(val),
            "interrupted": result.interrupted,
        },
        "timing": timing,
        "data": data_summary(job.data_dir, options, train, val, job.skipped),
        **refit_metadata(job),
    }


def refit_metadata(job):
    """{"refit": ...} for a model refitted on the whole folder (training/job.py, Job.refit), else {}. Its metrics
    stay the split's model's: no image it was not trained on is left to measure it with."""
    summary = getattr(job, "refit_summary", None)
    if not summary:
        return {}
    return {
        "refit": {
            **summary,
            "trained_on": "every image of the training folder, the held-out split included",
            "calibrated_on": "the held-out split, scored by the first model, which was trained without it",
        }
    }
