"""A model file's metadata checked against its schema (types and ranges of every field), before anything in the
file is used: a defect is one FolderCNNError naming it. file.py reads the file; this says whether its metadata
will do."""

import math

from ..errors import FolderCNNError

FORMAT_VERSION = 1
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 255
REQUIRED = ("architecture", "arch_args", "classes", "image_size", "preprocessing")
UNFAMILIAR_KEY = "unfamiliar"  # optional section; its tensors are allowed only when it is there


def _fail(where, problem):
    raise FolderCNNError(f"{where}: {problem}; this is not a usable foldercnn model file")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_metadata(meta, where):
    """Types and ranges of every field a model file's user relies on."""
    _check_format(meta, where)
    spec = _check_architecture(meta, where)
    _check_classes(meta["classes"], where)
    _check_preprocessing(meta["preprocessing"], spec, where)
    _check_calibration(meta.get("calibration"), where)
    if "tta" in meta and not isinstance(meta["tta"], bool):
        _fail(where, "tta must be true or false")
    _check_finite(meta, where, "metadata")
    _validate_shown(meta, where)
    if UNFAMILIAR_KEY in meta:
        _validate_unfamiliar(meta[UNFAMILIAR_KEY], where)


def _check_format(meta, where):
    """An object, of a format version this foldercnn reads, with every required field."""
    if not isinstance(meta, dict):
        _fail(where, "the metadata is not an object")
    version = meta.get("format_version", 0)
    if not _is_int(version) or version < 1:
        _fail(where, f"format_version {version!r} is not a positive whole number")
    if version > FORMAT_VERSION:
        raise FolderCNNError(f"{where} was written by a newer foldercnn (format {version}); upgrade foldercnn")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        _fail(where, f"the metadata lacks {', '.join(missing)}")


def _check_architecture(meta, where):
    """A known architecture, its arguments and image size; returns its registry spec."""
    from .registry import get_spec

    arch = meta["architecture"]
    if not isinstance(arch, str):
        _fail(where, "architecture is not a name")
    try:
        spec = get_spec(arch)
        spec.check_args(meta["arch_args"])
        spec.check_image_size(meta["image_size"], "image_size")
    except FolderCNNError as e:
        _fail(where, str(e))
    if "image_size" in meta["arch_args"] and meta["arch_args"]["image_size"] not in (None, meta["image_size"]):
        _fail(
            where,
            f"arch_args image_size {meta['arch_args']['image_size']} differs from image_size {meta['image_size']}",
        )
    return spec


def _check_classes(classes, where):
    """2 to MAX_CLASSES distinct, non-empty names of at most MAX_CLASS_NAME characters."""
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        _fail(where, f"classes must be a list of 2 to {MAX_CLASSES} names")
    if not all(isinstance(c, str) and c.strip() and len(c) <= MAX_CLASS_NAME for c in classes):
        _fail(where, f"every class name must be a non-empty string of at most {MAX_CLASS_NAME} characters")
    if len(set(classes)) != len(classes):
        _fail(where, "class names repeat")


def _check_preprocessing(pre, spec, where):
    """Mean and std per channel, the fit, the rescale, and for a landmark model how its hands are found."""
    if not isinstance(pre, dict):
        _fail(where, "preprocessing is not an object")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
            _fail(where, f"preprocessing {key} must be a list of 3 numbers")
    if not all(x > 0 for x in pre["std"]):
        _fail(where, "preprocessing std must be positive")
    if pre.get("fit", "squash") not in ("squash", "letterbox"):
        _fail(where, f"preprocessing fit {pre.get('fit')!r} is neither 'squash' nor 'letterbox'")
    if spec.input == "hand-landmarks":
        _validate_hands(pre, where)
    if "rescale" in pre and not (_is_number(pre["rescale"]) and pre["rescale"] > 0):
        _fail(where, "preprocessing rescale must be a positive number")


def _check_calibration(cal, where):
    """The optional calibration section: temperature in [0.01, 100], uncertain_below in [0, 1]."""
    if cal is None:
        return
    if not isinstance(cal, dict):
        _fail(where, "calibration is not an object")
    t = cal.get("temperature", 1.0)
    if not (_is_number(t) and 0.01 <= t <= 100):
        _fail(where, f"calibration temperature {t!r} is not a number in [0.01, 100]")
    u = cal.get("uncertain_below", 0.8)
    if not (_is_number(u) and 0 <= u <= 1):
        _fail(where, f"calibration uncertain_below {u!r} is not a number in [0, 1]")


def _check_finite(value, where, at, depth=0):
    """No NaN or infinity anywhere (JSON cannot carry them back out: GET /model answered 500)."""
    if depth > 32:
        _fail(where, f"{at} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, f"{at} is {value}, not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, f"{at}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, where, f"{at}[{i}]", depth + 1)


METRIC_RANGES = {"val_accuracy": (0, 1), "train_accuracy": (0, 1), "val_loss": (0, 1e9), "train_loss": (0, 1e9)}
COUNTS = ("epoch", "epochs_run", "n_train", "n_val")


def _validate_shown(meta, where):
    """The fields the report, the serve page and GET /model show: their types and ranges."""
    for key in ("metrics", "timing", "data", "recipe"):
        if key in meta and not isinstance(meta[key], dict):
            _fail(where, f"{key} is not an object")
    metrics = meta.get("metrics") or {}
    for key, (lo, hi) in METRIC_RANGES.items():
        if key in metrics and not (_is_number(metrics[key]) and lo <= metrics[key] <= hi):
            _fail(where, f"metrics {key} {metrics[key]!r} is not a number between {lo} and {hi:g}")
    for key in COUNTS:
        if key in metrics and not (_is_int(metrics[key]) and 0 <= metrics[key] <= 1 << 40):
            _fail(where, f"metrics {key} {metrics[key]!r} is not a whole number >= 0")
    if not all(_is_number(v) for v in (meta.get("timing") or {}).values()):
        _fail(where, "timing holds something that is not a number")
    if "seed" in meta and not (_is_int(meta["seed"]) and 0 <= meta["seed"] < 1 << 64):
        _fail(where, f"seed {str(meta['seed'])[:20]!r} is not a whole number between 0 and 2**64")


def _validate_hands(pre, where):
    """A landmark model's hands must be found as they were in training: the same finder (models, cascade,
    version), letterboxed images. Anything else in the record is refused, never trusted."""
    from ..data.hands import describe_finder

    if pre.get("fit") != "letterbox":
        _fail(where, "a hand-landmarks model needs preprocessing fit 'letterbox'")
    hands = pre.get("hands")
    if not isinstance(hands, dict) or not _is_int(hands.get("version")):
        _fail(where, "a hand-landmarks model needs preprocessing.hands with the finder's version")
    ours = describe_finder()
    if hands != ours:
        theirs = {k: str(v)[:80] for k, v in list(hands.items())[:6]}
        raise FolderCNNError(
            f"{where} was trained on hands found by another hand finder ({theirs}; this foldercnn's: "
            f"{ours}): train it again"
        )


def _validate_unfamiliar(section, where):
    from .unfamiliar import SCORE

    if not isinstance(section, dict):
        _fail(where, "the unfamiliar section is not an object")
    if section.get("score") != SCORE:
        _fail(where, f"unfamiliar score {section.get('score')!r} is unknown (expected {SCORE!r})")
    t = section.get("threshold")
    if not (_is_number(t) and t > 0):
        _fail(where, f"unfamiliar threshold {t!r} is not a finite positive number")
    if not isinstance(section.get("rule"), str):
        _fail(where, "unfamiliar rule is not text")
    d, r = section.get("feature_dim"), section.get("rank")
    if not (_is_int(d) and 1 <= d <= 1 << 16):
        _fail(where, f"unfamiliar feature_dim {d!r} is not a whole number between 1 and 65536")
    if not (_is_int(r) and 1 <= r <= d):
        _fail(where, f"unfamiliar rank {r!r} is not a whole number between 1 and feature_dim {d}")
    inv_rest = section.get("inv_rest")
    if not (_is_number(inv_rest) and inv_rest >= 0):
        _fail(where, f"unfamiliar inv_rest {inv_rest!r} is not a finite number >= 0")
    if r < d and inv_rest == 0:
        _fail(where, "a low-rank unfamiliar section needs a positive inv_rest")
    if "shrinkage" in section and not (_is_number(section["shrinkage"]) and 0 <= section["shrinkage"] <= 1):
        _fail(where, "unfamiliar shrinkage is not a number in [0, 1]")
