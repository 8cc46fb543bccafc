"""`foldercnn demo`: the Keras Rock-Paper-Scissors tutorial's whole journey in one command."""

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from . import run_folder as rf
from .data import hands
from .data.cache import user_cache_dir as cache_dir
from .data.download import OfflineError, fetch_zip
from .data.folders import stratified_split
from .data.inspect import format_report, inspect_folder
from .deploy.predict import predict_paths
from .errors import FolderCNNError, OptionError
from .evaluation.metrics import evaluate_folder, folder_row, format_evaluation, format_folder_table
from .evaluation.report import save_evaluation, save_other_folders, write_report
from .models.inference import load
from .training.job import train_folder
from .training.recipes import get_recipe

RPS_BASE_URL = "https://storage.googleapis.com/laurencemoroney-blog.appspot.com/"
RPS_ZIPS = {"train": "rps.zip", "test": "rps-test-set.zip"}


def _has_classes(d):
    return d.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in d.iterdir())


def _unwrap(folder):
    """A zip's single top-level folder (rps/, rps-test-set/) holds the class folders."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and all(q.is_dir() for q in entries[0].iterdir()):
        return entries[0]
    return folder


def download_rps(target, base_url=None, progress=True):
    """Download the tutorial's two zips into target/train and target/test."""
    base_url = base_url or os.environ.get("FOLDERCNN_RPS_URL") or RPS_BASE_URL
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for split, name in RPS_ZIPS.items():
        if _has_classes(target / split):
            continue
        unpacked = fetch_zip(base_url.rstrip("/") + "/" + name, target / f".{split}-unpacked", target, progress)
        inner = _unwrap(unpacked)
        if (target / split).exists():
            shutil.rmtree(target / split)
        os.replace(inner, target / split)
        shutil.rmtree(unpacked, ignore_errors=True)
    return target


def find_rps(data=None, log=print, progress=True):
    """--data, else $FOLDERCNN_RPS_DIR, else the cache, else download. Returns (folder, how it was found)."""
    if data is not None:
        data = Path(data)
        if not (data / "train").is_dir():
            raise FolderCNNError(
                f"{data} has no train/ folder (expected train/<class>/..., optionally test/ and validation/)"
            )
        return data, "--data"
    if os.environ.get("FOLDERCNN_RPS_DIR"):
        d = Path(os.environ["FOLDERCNN_RPS_DIR"])
        if (d / "train").is_dir():
            return d, "$FOLDERCNN_RPS_DIR"
        log(f"$FOLDERCNN_RPS_DIR={d} has no train/ folder; ignoring it")
    cached = cache_dir() / "rps"
    if _has_classes(cached / "train") and _has_classes(cached / "test"):
        return cached, "cache"
    log(f"downloading the Rock-Paper-Scissors images (about 230 MB) into {cached}")
    return download_rps(cached, progress=progress), "download"


def make_digits_folder(target):
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with the package) as PNG folders."""
    from sklearn.datasets import load_digits

    target = Path(target)
    if _has_classes(target / "train") and _has_classes(target / "test"):
        return target
    digits = load_digits()
    train_idx, test_idx = stratified_split(digits.target, 0.2, seed=0)
    staging = target.with_name(target.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        for i in idx.tolist():
            pixels = (255 - digits.images[i] * (255 / 16)).round().astype(np.uint8)  # dark ink on white
            out = staging / split / str(digits.target[i]) / f"digit{i}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "L").save(out)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return target


def find_photos(photos=None, log=print):
    """Labelled folders of real photos to measure the model on: --photos, else $FOLDERCNN_RPS_PHOTOS_DIR.

    The folder may itself hold the class folders, or hold several such folders (one per source)."""
    how = "--photos"
    if photos is None:
        photos, how = os.environ.get("FOLDERCNN_RPS_PHOTOS_DIR"), "$FOLDERCNN_RPS_PHOTOS_DIR"
        if not photos:
            return []
    photos = Path(photos)
    if not photos.is_dir():
        if how == "--photos":
            raise OptionError("photos", f"{photos}: no such folder")
        log(f"{how}={photos} is not a folder; no real photos to measure on")
        return []
    names = {"paper", "rock", "scissors"}
    if names & {p.name for p in photos.iterdir() if p.is_dir()}:
        return [photos]
    found = sorted(p for p in photos.iterdir() if p.is_dir() and names & {q.name for q in p.iterdir() if q.is_dir()})
    if not found:
        log(f"{how}={photos} holds no rock/paper/scissors folders; no real photos to measure on")
    return found


# The demo's model should work on a photo of the user's own hand, not only on the tutorial's CGI test set: `hands`
# when the hand finder's runtime (onnxruntime) is installed, else `robust` (benchmarks/real_photos.py; figures in
# docs/real-photos.md).
DEMO_RECIPE, DEMO_RECIPE_WITHOUT_HANDS = "hands", "robust"
# Offline, the digits fallback keeps `fast`: `robust` rotates by any angle, and a 6 is not a rotated 9.
OFFLINE_RECIPE = "fast"


def run_demo(
    data=None,
    out="foldercnn-demo",
    recipe=None,
    seed=0,
    precision="auto",
    time_budget=None,
    log=print,
    progress=True,
    photos=None,
    device="auto",
    **overrides,
):
    """Find data, inspect, train, plot, evaluate on the test set and on real photos (when found), classify
    validation/, list the outputs. recipe None: DEMO_RECIPE for Rock-Paper-Scissors, OFFLINE_RECIPE offline."""
    recipe_obj = get_recipe(recipe, **overrides) if recipe else None  # a named recipe is checked before any download
    out = Path(out)
    root, found, title, recipe_obj = _find_data(data, recipe_obj, overrides, log, progress)
    recipe_obj = _choose_recipe(recipe_obj, overrides, log)
    log(f"\n== 1. data: {title} from {root} ({found})")
    report = inspect_folder(root / "train", out_dir=out)
    log(format_report(report))

    test_dir = root / "test" if _has_classes(root / "test") else None
    log(f"\n== 2. train: recipe '{recipe_obj.name}' ({recipe_obj.description})")
    # every recipe validates (and fits its temperature) on a split held out of train/, never on test/
    result = train_folder(
        root / "train",
        out,
        recipe=recipe_obj.name,
        seed=seed,
        precision=precision,
        device=device,
        time_budget=time_budget,
        log=log,
        **overrides,
    )

    outputs = {
        "sample grid": out / rf.SAMPLES,
        "augmentation preview": out / rf.AUGMENTATIONS,
        "training curves": out / rf.CURVES,
        "training history": out / rf.HISTORY,
        "model": result.model_path,
    }
    classifier = load(result.model_path)
    ev = _evaluate_test(classifier, test_dir, out, outputs, log) if test_dir else None
    photo_dirs = find_photos(photos, log) if title == "Rock-Paper-Scissors" else []
    if photo_dirs and test_dir:
        _evaluate_real_photos(classifier, photo_dirs, ev, out, outputs, log)
    outputs["report"] = write_report(out)
    if (root / "validation").is_dir():
        _classify_validation(classifier, root / "validation", log)
    _list_outputs(result, outputs, log)
    return result


def _find_data(data, recipe_obj, overrides, log, progress):
    """(root, how it was found, title, recipe): Rock-Paper-Scissors, or offline the digits with OFFLINE_RECIPE."""
    try:
        root, found = find_rps(data, log=log, progress=progress)
        title = "Rock-Paper-Scissors"
    except OfflineError as e:
        log(
            f"offline: {e}.\nRunning the same journey on scikit-learn's handwritten digits instead "
            "(1,797 real images that ship with scikit-learn)."
        )
        root, found, title = make_digits_folder(cache_dir() / "digits"), "offline fallback", "handwritten digits"
        recipe_obj = recipe_obj or get_recipe(OFFLINE_RECIPE, **overrides)
    return root, found, title, recipe_obj


def _choose_recipe(recipe_obj, overrides, log):
    """The recipe given, else DEMO_RECIPE when the hand finder's runtime (onnxruntime) is installed, else
    DEMO_RECIPE_WITHOUT_HANDS."""
    if recipe_obj is None and not hands.available():
        log(
            f"(onnxruntime, which finds the hands, is not installed, so the demo trains "
            f"'{DEMO_RECIPE_WITHOUT_HANDS}' instead of "
            f"'{DEMO_RECIPE}': {hands.INSTALL_HINT})"
        )
    return recipe_obj or get_recipe(DEMO_RECIPE if hands.available() else DEMO_RECIPE_WITHOUT_HANDS, **overrides)


def _evaluate_test(classifier, test_dir, out, outputs, log):
    """Step 3: the test set's Evaluation, its figures saved in OUT and added to `outputs`."""
    log(f"\n== 3. evaluate on the test set {test_dir} (never used to train, choose or calibrate the model)")
    ev = evaluate_folder(classifier, test_dir)
    log(format_evaluation(ev))
    save_evaluation(ev, out, classifier=classifier)
    outputs["test evaluation"] = out / rf.EVALUATION
    outputs["confusion matrix"] = out / rf.CONFUSION
    outputs["worst mistakes"] = out / rf.MISTAKES
    outputs["calibration"] = out / rf.CALIBRATION
    return ev


def _evaluate_real_photos(classifier, photo_dirs, ev, out, outputs, log):
    """Step 3b: each folder of real photos beside the test set's figures, saved as other_folders.json."""
    log("\n== 3b. real photos of hands (the tutorial's test set is CGI, like its training set)")
    real = [evaluate_folder(classifier, d) for d in photo_dirs]
    log(format_folder_table([folder_row(e.to_dict()) for e in [ev] + real]))
    save_other_folders(real, out)
    n_real = sum(e.n for e in real)
    log(
        f"accuracy on the CGI test set {ev.accuracy:.1%}; on {n_real} real photos "
        f"{sum(e.accuracy * e.n for e in real) / n_real:.1%} (chance: {1 / len(classifier.classes):.0%})"
    )
    outputs["real photos"] = out / rf.OTHER_FOLDERS


def _classify_validation(classifier, extra, log):
    """Step 4: every photo of validation/ classified, each marked against its folder's name."""
    log(f"\n== 4. classify new photos: {extra}")
    predictions, skipped = predict_paths(classifier, [extra])
    right = 0
    for p in predictions:
        truth = Path(p.path).parent.name
        right += truth == p.label
        if not p.answered:
            log(f"  ---   {Path(p.path).relative_to(extra)}: no hand found")
            continue
        mark = "ok " if truth == p.label else "WRONG"
        flag = "  (uncertain)" if p.uncertain else ""
        log(f"  {mark} {Path(p.path).relative_to(extra)}: {p.label} ({p.probability:.1%}){flag}")
    if predictions:
        log(f"  {right}/{len(predictions)} match their folder name")
    for path, why in skipped:
        log(f"  skipped {path}: {why}")


def _list_outputs(result, outputs, log):
    """The closing lines: time taken, where every output is, and how to use the model."""
    log(f"\n== done in {result.seconds['data'] + result.seconds['train']:.0f} s of data + training. Outputs:")
    for what, path in outputs.items():
        log(f"  {what:<22} {path}")
    log(f"try: foldercnn predict {result.model_path} YOUR_PHOTO.jpg")
