"""The whole job: a labelled folder -> a run folder (model file, history, figures, report.html).

`train_folder` is a short sequence of named steps; the loop itself is `loop.fit`.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import run_folder as rf
from .. import runtime
from ..data.augment import augment_batch
from ..data.captures import burst_group_ids, merge_groups
from ..data.duplicates import groups_of, near_duplicate_groups
from ..data.hands import describe_finder, draw_skeleton, find_hands
from ..data.folders import (check_same_classes, group_split, load_folder, scan_folder, stratified_split,
                            summarize_skipped)
from ..errors import FolderCNNError
from ..evaluation.calibration import choose_temperature
from ..evaluation.metrics import calibration_summary
from ..evaluation.report import write_report
from ..files import check_out_dir
from ..models.file import save_model
from ..models.inference import DEFAULT_UNCERTAIN_BELOW, batched_logits, hand_pass, takes_hands
from ..models.preprocess import decode_size, default_preprocessing
from ..models import unfamiliar
from ..models.registry import count_parameters, create_model, get_spec, summary
from ..plots import augmentation_preview, sample_grid, training_curves
from . import checkpoint as ckpt
from . import distributed
from .loop import fit
from .recipes import check_recipe, get_recipe
from .hands import landmark_probe
from .transfer import linear_probe


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


SPLITS = ("groups", "images")


def prepare_data(data_dir, recipe, val_dir=None, val_fraction=None, seed=0, log=print, split="groups"):
    """Scan and decode the training (and validation) images once; split if no validation folder.

    split "groups" keeps every group of near-duplicates on one side; "images" splits image by image."""
    if split not in SPLITS:
        raise FolderCNNError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    if val_dir is not None and val_fraction is not None:
        raise FolderCNNError("give either --val or --val-fraction, not both")
    folder = scan_folder(data_dir)
    size = decode_size(recipe.image_size, get_spec(recipe.model).fit)
    if val_dir is not None:
        val_folder = scan_folder(val_dir, min_classes=1)
        check_same_classes(folder.classes, val_dir, val_folder.classes)
        train = load_folder(folder, size)
        val = load_folder(val_folder, size)
        skipped = train.skipped + val.skipped
        log(f"validation: {len(val)} images from {val_dir}")
    else:
        fraction = 0.2 if val_fraction is None else val_fraction
        everything = load_folder(folder, size)
        # near-duplicates (burst frames, augmented copies, neighbouring renders) stay on one side of the split,
        # or validation accuracy, the temperature and the unfamiliarity threshold all flatter the model
        # (and the frames of one Teach-panel recording burst, data/captures.py)
        groups = merge_groups(near_duplicate_groups(everything.images, everything.paths),
                              burst_group_ids(everything.paths)) if split == "groups" else \
            torch.arange(len(everything))
        train_idx, val_idx, cut = group_split(everything.labels, groups, fraction, seed)
        if len(val_idx) == 0:
            raise FolderCNNError(f"too few images in {data_dir} to hold out a validation split")
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        skipped = everything.skipped
        how = "default " if val_fraction is None else ""
        kept = ""
        if split == "groups":
            dup_groups = groups_of(groups)
            kept = (f"; {len(dup_groups)} groups of near-duplicates ({sum(map(len, dup_groups))} images) "
                    f"kept on one side")
        log(f"validation: a stratified {fraction:.0%} of {data_dir} held out ({how}--val-fraction, seed {seed}): "
            f"{len(train)} images train, {len(val)} validate{kept}")
        if cut:
            names = ", ".join(everything.classes[c] for c in cut)
            log(f"note: long sequences of near-duplicates in {names} were cut into runs of consecutive images; "
                f"the frames at the ends of a run have neighbours on the other side")
    if skipped:
        log(f"skipped {len(skipped)} file(s):\n{summarize_skipped(skipped)}")
    return train, val, skipped


def data_summary(data_dir, val_dir, val_fraction, train, val, skipped, split="groups", max_listed=50):
    """What the model was trained on, for the model file and the report."""
    counts = {c: [int((train.labels == i).sum()), int((val.labels == i).sum())] for i, c in enumerate(train.classes)}
    how = f"the folder {val_dir}" if val_dir is not None else \
        (f"a stratified{', near-duplicate-aware' if split == 'groups' else ''} "
         f"{0.2 if val_fraction is None else val_fraction:.0%} held out of the training folder")
    return {"train_dir": str(data_dir), "validation": how, "counts": counts, "n_skipped": len(skipped),
            "skipped": [{"path": str(p), "reason": r} for p, r in skipped[:max_listed]]}


FINAL_PASS_CHUNK = 1024  # images copied out of the (memory-mapped) decoded set at a time


def final_pass(model, data, recipe, device):
    """(logits, features, rows with an answer) of the trained model on decoded images; see image_pass. A landmark
    model answers only the images in which a hand is found."""
    if takes_hands(model):
        parts = [hand_pass(model, data.take(slice(k, k + FINAL_PASS_CHUNK))) for k in range(0, len(data),
                                                                                          FINAL_PASS_CHUNK)]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.from_numpy(np.concatenate([p[2].found for p in parts])))
    logits, features = image_pass(model, data, recipe, device)
    return logits, features, torch.ones(len(logits), dtype=torch.bool)


def image_pass(model, data, recipe, device):
    """(logits, penultimate features) of the trained model on decoded images: eval mode, fp32, no augmentation,
    the batched inference path that prediction uses. Chunk by chunk: taking every image at once would copy a
    memory-mapped training set larger than RAM into memory (benchmarks/scale.py: killed at 32x RPS under 1.2 GB).
    Batches of 64: batches of 256 held ~290 MB more activations at 64 px, for no speed measured on CPU."""
    parts = [batched_logits(model, data.take(slice(k, k + FINAL_PASS_CHUNK)), recipe.mean, recipe.std, device,
                            recipe.tta, batch_size=64, features=True) for k in range(0, len(data), FINAL_PASS_CHUNK)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def calibrate(logits, labels, uncertain_below=DEFAULT_UNCERTAIN_BELOW):
    """Fit the softmax temperature on the validation split's logits (never a test folder's) for the model file."""
    t, rule = choose_temperature(logits, labels)
    cal = calibration_summary(logits, labels, t)
    before, after = cal["uncalibrated"], cal["calibrated"]
    return {"temperature": t, "uncertain_below": uncertain_below, "rule": rule,
            "fitted_on": f"validation split ({len(labels)} images)",
            "val_errors": int((logits.argmax(1) != labels).sum()),
            "val_nll_before": before["nll"], "val_nll_after": after["nll"],
            "val_ece_before": before["ece"], "val_ece_after": after["ece"]}


# The unfamiliarity fit (a mean per class, one shared covariance of at most 1,280-d features, Ledoit-Wolf shrunk)
# needs the final pass over the training images, which at 80,640 images (benchmarks/scale.py, 32x) took 38 s,
# four times the training's 60 steps. Above 10,000 images it is fitted on a stratified sample of that many: 5 to
# 8 images per feature dimension. Small samples do move the threshold: on RPS (`fast`, 192-d features) fitting on
# 1,000 of 1,942 training images instead of all lowered it from 1,236 to 801 and flagged 8.6% of rps/test instead
# of 0%. How much 10,000 of many more moves it was not measured: no folder that big of distinct images was at hand.
UNFAMILIARITY_FIT_MAX = 10_000


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
    threshold on the validation split's only."""
    try:
        fitted = unfamiliar.fit(train_features, train_labels, val_features, val_labels, num_classes=num_classes)
    except ValueError as e:
        log(f"no unfamiliarity score: {e}")
        return None
    if not fitted.threshold < float("inf"):
        log("no unfamiliarity score: the validation split gave no usable threshold")
        return None
    log(f"unfamiliarity: Mahalanobis distance on {fitted.feature_dim}-d features (rank {fitted.rank}), "
        f"threshold {fitted.threshold:.4g} ({fitted.rule})")
    return fitted


def build_model(recipe, num_classes, seed):
    torch.manual_seed(seed)
    return create_model(recipe.model, num_classes, pretrained=recipe.pretrained, **recipe.model_args)


def draw_previews(out_dir, data_dir, train, recipe, seed):
    """augmentations.png (one image per class, augmented) and samples.png (six per class)."""
    preview_idx = [int((train.labels == c).nonzero()[0]) for c in range(len(train.classes))
                   if (train.labels == c).any()][:4]
    described = ", ".join(f"{k}={v}" for k, v in recipe.augment.to_dict().items() if v)
    augmentation_preview(train.take(torch.tensor(preview_idx)), lambda x, g: augment_batch(x, recipe.augment, g),
                         described, out_dir / rf.AUGMENTATIONS, seed=seed)
    shown = torch.cat([(train.labels == c).nonzero().flatten()[:: max(1, int((train.labels == c).sum()) // 6)][:6]
                       for c in range(len(train.classes))])  # six spread-out images per class, not a copy of all
    images, what = train.take(shown), "as the model sees them"
    if get_spec(recipe.model).input == "hand-landmarks":  # the landmarks found are what the model sees
        found = find_hands(images.numpy(), pool_from=1)  # in a child: this process stays free of MediaPipe
        images = torch.from_numpy(np.stack([draw_skeleton(im, found.hand(i)) for i, im in enumerate(images.numpy())]))
        what = "with the hand landmarks found"
    sample_grid(images, train.labels[shown], train.classes, out_dir / rf.SAMPLES,
                title=f"{Path(data_dir).name}: training images per class ({recipe.image_size} px, {what})")


def run_training(model, train, val, recipe, *, fine_tune, device, precision, seed, deadline, log, save_history,
                 checkpoint=None, resume=None, ranks=distributed.SINGLE):
    """The recipe's training: the loop, or a linear probe (then, with fine_tune, the loop on its last blocks).

    Returns (FitResult, fine-tuning epochs finished). save_history(rows) runs after every epoch; checkpoint
    and resume go to the loop (a resumed fine-tuning run recomputes the probe, which is deterministic)."""
    loop = dict(device=device, precision=precision, seed=seed, log=log, deadline=deadline, checkpoint=checkpoint,
                resume=resume, ranks=ranks)
    if not recipe.linear_probe:
        return fit(model, train, val, recipe, on_epoch=lambda r: save_history(r.history), **loop), 0
    if takes_hands(model):
        return landmark_probe(model, train, val, recipe, seed=seed, log=log, deadline=deadline), 0
    probe = linear_probe(model, train, val, recipe, device=device, precision=precision, seed=seed, log=log,
                         deadline=deadline)
    if not fine_tune:
        return probe, 0
    log(f"fine-tuning the last {recipe.fine_tune_blocks} blocks for {recipe.epochs} epochs")
    model.load_state_dict(probe.best_state)
    probe_row = dict(probe.history[-1], epoch=0)  # epoch 0 of the history: the linear probe
    model.freeze_for_fine_tuning(recipe.fine_tune_blocks)
    try:
        result = fit(model, train, val, recipe, on_epoch=lambda r: save_history([probe_row] + r.history), **loop)
    finally:
        model.unfreeze()
    epochs_done = len(result.history)
    result.history = [probe_row] + result.history
    if result.best_state is None:
        log("no fine-tuning epoch finished: the model is the linear probe (fine_tuned_epochs 0 in the model file)")
        result.best_state, result.best_epoch = probe.best_state, 1
    else:
        result.best_epoch += 1
        if recipe.wise_ft:
            result.best_state = weight_space_ensemble(probe.best_state, result.best_state, recipe.wise_ft)
            log(f"weight-space ensemble (WiSE-FT): {1 - recipe.wise_ft:g} x probe + {recipe.wise_ft:g} x fine-tuned "
                f"weights")
    return result, epochs_done


def weight_space_ensemble(probe_state, tuned_state, alpha):
    """WiSE-FT (Wortsman et al., CVPR 2022): (1 - alpha) * probe + alpha * fine-tuned, tensor by tensor. The two
    share their frozen layers and batch-norm statistics, so the mix is one network of the same shape."""
    return {k: torch.lerp(probe_state[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
            for k, v in tuned_state.items()}


def model_metadata(recipe, train, val, skipped, *, data_dir, val_dir, val_fraction, seed, precision, fine_tune,
                   fine_tuned_epochs, result, calibration, timing, split="groups"):
    best = result.history[result.best_epoch - 1]
    return {
        "architecture": recipe.model,
        "arch_args": recipe.model_args,
        "classes": train.classes,
        "image_size": recipe.image_size,
        "preprocessing": default_preprocessing(recipe.mean, recipe.std, get_spec(recipe.model).fit,
                                               describe_finder() if get_spec(recipe.model).input != "image" else None),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "precision": precision,
        "tta": recipe.tta,
        "fine_tuned": bool(fine_tune and fine_tuned_epochs > 0),
        "fine_tuned_epochs": fine_tuned_epochs,
        "calibration": calibration,
        "metrics": {"epoch": result.best_epoch, "epochs_run": len(result.history),
                    "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
                    "train_accuracy": best["accuracy"], "train_loss": best["loss"],
                    "n_train": len(train), "n_val": len(val), "interrupted": result.interrupted},
        "timing": timing,
        "data": data_summary(data_dir, val_dir, val_fraction, train, val, skipped, split),
    }


def find_resume(out_dir, identity, resume, log):
    """The checkpoint to continue from, or None. A checkpoint left in RUN_DIR is used (with a message) unless
    resume is False; one from a different data folder, split or recipe is refused unless resume == "force"."""
    path = Path(out_dir) / ckpt.FILE
    if resume is False or not path.is_file():
        if resume is True:
            raise FolderCNNError(f"--resume: no checkpoint in {out_dir} (nothing to continue)")
        return None
    info, tensors = ckpt.read(path)
    changed = [k for k in identity if info["identity"].get(k) != identity[k]]
    if changed and resume != "force":
        raise FolderCNNError(f"{path} belongs to a different run (changed: {', '.join(changed)}); "
                             "use --resume force to continue anyway, or another --out, or delete the checkpoint")
    log(f"continuing the interrupted run in {out_dir} from {path.name} (epoch {info['epoch']} finished"
        + (f"; {', '.join(changed)} changed, continuing anyway" if changed else "")
        + "); delete that file to start over")
    return info, tensors


def train_folder(data_dir, out_dir, recipe="fast", val_dir=None, val_fraction=None, seed=0,
                 precision="auto", device="auto", time_budget=None, fine_tune=False,
                 uncertain_below=DEFAULT_UNCERTAIN_BELOW, log=print, resume=None, split="groups", **overrides):
    """Train a classifier on DATA_DIR and write the run directory. Returns a TrainResult.

    split: how the validation images are held out of DATA_DIR (without val_dir): "groups" keeps near-duplicates
    (burst frames, copies, neighbouring renders) on one side, "images" splits image by image.
    time_budget: seconds of wall clock for the whole job, decoding included; training runs as many
    epochs as fit in it (the learning-rate schedule follows the clock) and keeps the best epoch.
    resume: None continues from RUN_DIR/checkpoint.safetensors when one is there (an interrupted run),
    True requires one, False ignores it, "force" continues even if the data or recipe changed.
    Process-wide speed settings (threads, allocator) are the caller's: see `foldercnn.runtime.setup()`.
    Launched by torchrun (WORLD_SIZE > 1), the processes train one model together (distributed.py): rank 0
    alone writes the run folder and logs; every rank returns when it is written.
    """
    t0 = time.perf_counter()
    recipe = get_recipe(recipe, **overrides) if isinstance(recipe, str) else recipe
    check_recipe(recipe, fine_tune=fine_tune)
    distributed.check_world(recipe, distributed.launched_world_size())
    if time_budget is not None and not time_budget > 0:
        raise FolderCNNError(f"--time-budget must be positive, got {time_budget}")
    if not 0.0 <= uncertain_below <= 1.0:
        raise FolderCNNError(f"--uncertain-below must be between 0 and 1, got {uncertain_below}")
    check_out_dir(out_dir, [data_dir, val_dir])
    ranks, device = distributed.start(runtime.choose_device(device))
    try:
        return _train(data_dir, Path(out_dir), recipe, val_dir=val_dir, val_fraction=val_fraction, seed=seed,
                      precision=runtime.resolve_precision(precision, device), device=device,
                      time_budget=time_budget, fine_tune=fine_tune, uncertain_below=uncertain_below,
                      log=log if ranks.is_main else _silent, resume=resume, split=split, ranks=ranks, t0=t0)
    finally:
        ranks.stop()


def _silent(*args, **kwargs):
    pass


def _train(data_dir, out_dir, recipe, *, val_dir, val_fraction, seed, precision, device, time_budget, fine_tune,
           uncertain_below, log, resume, split, ranks, t0):
    """train_folder once the arguments are checked and the processes (one, or torchrun's) are joined."""
    # about a second is kept back for saving the model and drawing the curves
    deadline = None if time_budget is None else t0 + time_budget - 1.0

    with ranks.local_main_first():  # one process per machine decodes and fills the decode cache, the others read it
        train, val, skipped = prepare_data(data_dir, recipe, val_dir, val_fraction, seed, log, split)
    t_data = time.perf_counter() - t0
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    identity = json.loads(json.dumps({  # as the checkpoint's JSON will give it back
        "data": ckpt.fingerprint(train.paths + val.paths, [len(train), len(val)]),
        "recipe": recipe.to_dict(), "seed": seed, "precision": precision, "fine_tune": bool(fine_tune),
        "split": split}))
    resume_from = find_resume(out_dir, identity, resume, log)  # every rank reads rank 0's checkpoint
    if resume_from is not None and deadline is not None:
        deadline -= resume_from[0]["seconds_spent"]  # the budget counts the time already spent
    model = build_model(recipe, len(train.classes), seed)
    log(f"recipe '{recipe.name}': {recipe.description}")
    log(f"model {recipe.model} at {recipe.image_size}x{recipe.image_size}, {count_parameters(model):,} parameters, "
        f"{device.type} {precision}, {torch.get_num_threads()} threads"
        + (f" in each of {ranks.world} processes ({recipe.batch_size // ranks.world} images of every batch of "
           f"{recipe.batch_size} each)" if ranks.world > 1 else ""))
    log(summary(model, recipe.image_size))
    if ranks.is_main:
        draw_previews(out_dir, data_dir, train, recipe, seed)
    if deadline is not None:
        log(f"time budget: {time_budget:g} s in all, {deadline - time.perf_counter():.1f} s left for training")

    t1 = time.perf_counter()
    writes = ranks.is_main
    result, fine_tuned_epochs = run_training(
        model, train, val, recipe, fine_tune=fine_tune, device=device, precision=precision, seed=seed,
        deadline=deadline, log=log,
        save_history=(lambda rows: rf.write_history(out_dir / rf.HISTORY, rows)) if writes else _silent,
        checkpoint=(lambda write: write(out_dir / ckpt.FILE, {"identity": identity})) if writes else None,
        resume=resume_from, ranks=ranks)
    t_train = time.perf_counter() - t1
    if result.best_state is None:
        raise FolderCNNError("stopped before the first epoch finished; no model saved")
    model.load_state_dict(result.best_state)
    if not ranks.is_main:  # rank 0 evaluates, calibrates and writes; wait until the run folder is complete
        ranks.barrier()
        return TrainResult(out_dir, out_dir / rf.MODEL, result.history, result.best_epoch, train.classes, recipe,
                           result.interrupted, len(train), len(val), skipped, {"data": t_data, "train": t_train},
                           fine_tuned_epochs, main_process=False)

    val_logits, val_features, answered = final_pass(model, val, recipe, device)  # one pass serves both fits below
    val_logits, val_features, val_labels = val_logits[answered], val_features[answered], val.labels[answered]
    if fine_tuned_epochs and recipe.wise_ft:
        log(f"validation accuracy of the ensembled weights: "
            f"{(val_logits.argmax(1) == val_labels).float().mean().item():.4f}")
    calibration = calibrate(val_logits, val_labels, uncertain_below)
    log(f"calibration on the validation split: temperature {calibration['temperature']:.3f} "
        f"({calibration['rule']}), NLL "
        f"{calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f}, expected calibration error "
        f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}")
    unfamiliarity = None
    if get_spec(recipe.model).unfamiliarity:
        sample = unfamiliarity_sample(train, seed, log)
        _, sample_features, sample_answered = final_pass(model, sample, recipe, device)
        unfamiliarity = fit_unfamiliarity(sample_features[sample_answered], sample.labels[sample_answered],
                                          val_features, val_labels, len(train.classes), log)
    else:  # benchmarks/README.md: on real photos the landmark-space distance flagged right and wrong answers alike
        log("unfamiliarity: a photo without a hand found is what this model calls unfamiliar")
    metadata = model_metadata(recipe, train, val, skipped, data_dir=data_dir, val_dir=val_dir,
                              val_fraction=val_fraction, seed=seed, precision=precision, fine_tune=fine_tune,
                              fine_tuned_epochs=fine_tuned_epochs, result=result, calibration=calibration,
                              timing={"data_seconds": t_data, "train_seconds": t_train}, split=split)
    model_path = save_model(out_dir / rf.MODEL, model, metadata, unfamiliarity)
    rf.write_history(out_dir / rf.HISTORY, result.history)
    training_curves(result.history, out_dir / rf.CURVES,
                    title=f"{recipe.name} recipe: {len(train)} training images, {len(val)} validation")
    log(f"report: {write_report(out_dir)}")
    if not result.interrupted:  # finished: a later run in this folder starts afresh
        (out_dir / ckpt.FILE).unlink(missing_ok=True)
    ranks.barrier()
    return TrainResult(out_dir, model_path, result.history, result.best_epoch, train.classes, recipe,
                       result.interrupted, len(train), len(val), skipped,
                       {"data": t_data, "train": t_train}, fine_tuned_epochs)
