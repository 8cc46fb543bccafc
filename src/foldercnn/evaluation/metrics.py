"""Measure a model file on a labelled folder, honestly: accuracy with its 95% interval, per-class metrics,
confusion matrix, the worst mistakes, and how far the model's confidence can be trusted (calibration)."""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.folders import load_folder, scan_folder
from ..models.inference import DEFAULT_UNCERTAIN_BELOW
from .calibration import expected_calibration_error, nll, reliability_bins, wilson_interval
from .formatting import (  # noqa: F401 (moved there; imported from here too)
    FOLDER_TABLE_HEADER,
    _fmt,
    folder_row,
    folder_table_cells,
    format_evaluation,
    format_flags,
    format_folder_table,
    table_header,
)
from .looking import looking_summary


@dataclass
class Evaluation:
    classes: list
    accuracy: float
    n: int
    per_class: dict  # class -> {precision, recall, f1, support}
    confusion: list  # rows: true class, columns: predicted class
    skipped: list = field(default_factory=list)  # (path, reason)
    paths: list = field(default_factory=list)
    y_true: list = field(default_factory=list)
    probabilities: list = field(default_factory=list)  # calibrated, one row per image
    accuracy_ci: tuple = (0.0, 1.0)  # 95% Wilson interval
    macro: dict = field(default_factory=dict)  # unweighted mean precision/recall/f1 over classes
    calibration: dict = field(default_factory=dict)  # temperature, ECE/NLL before and after, bins
    uncertain: dict = field(default_factory=dict)  # threshold, how many flagged, accuracy of each group
    unfamiliarity: list | None = None  # score / threshold per image (None: the model file has no unfamiliarity score)
    flags: dict = field(default_factory=dict)  # uncertain / unfamiliar / either: shares, errors caught, AUROCs
    data_dir: str | None = None
    model_path: str | None = None
    tta: bool = False
    seconds: float = 0.0
    answered: list | None = None  # landmark models: whether a hand was found in each image (None: every image answered)
    hands: dict | None = None  # landmark models: coverage and accuracy where a hand was found
    looking: dict | None = None  # looking.looking_summary: where it looked, against the subject's mask

    def rows(self):
        """One dict per image: path, true and predicted class, the top and the true class's probability."""
        unf = self.unfamiliarity if self.unfamiliarity is not None else [None] * len(self.y_true)
        answered = self.answered if self.answered is not None else [True] * len(self.y_true)
        return [
            {
                "path": str(p),
                "true": self.classes[t],
                "predicted": self.classes[int(np.argmax(pr))] if a else None,
                "probability": float(max(pr)) if a else 0.0,
                "true_probability": float(pr[t]) if a else 0.0,
                "unfamiliar": True if not a else (None if u is None else bool(u > 1)),
                "unfamiliarity": u if a else None,
            }
            for p, t, pr, u, a in zip(self.paths, self.y_true, self.probabilities, unf, answered)
        ]

    def mistakes(self, limit=None):
        """Wrong predictions, most confident first: the ones that most mislead a user."""
        rows = sorted(
            (r for r in self.rows() if r["predicted"] is not None and r["true"] != r["predicted"]),
            key=lambda r: -r["probability"],
        )
        return rows[:limit]

    def to_dict(self):
        return {
            "accuracy": self.accuracy,
            "accuracy_ci95": list(self.accuracy_ci),
            "n": self.n,
            "n_correct": int(round(self.accuracy * self.n)),
            "n_skipped": len(self.skipped),
            "classes": self.classes,
            "per_class": self.per_class,
            "macro_avg": self.macro,
            "confusion": self.confusion,
            "calibration": self.calibration,
            "uncertain": self.uncertain,
            "flags": self.flags,
            "mistakes": self.mistakes(),
            "predictions": self.rows(),
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "data_dir": self.data_dir,
            "model": self.model_path,
            "tta": self.tta,
            "seconds": self.seconds,
            **({"hands": self.hands} if self.hands is not None else {}),
            **({"looking": self.looking} if self.looking is not None else {}),
        }


def metrics_from_predictions(y_true, y_pred, classes):
    """Accuracy, per-class precision/recall/F1/support and the confusion matrix (scikit-learn).

    A class the model never predicts gets precision 0 (not NaN, not a warning): it helps nobody.
    """
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # 1.5 s to import: when used

    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    cm = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0
    return accuracy, per_class, cm


def macro_average(per_class):
    """Unweighted means over the classes that occur in the data (support > 0)."""
    present = [m for m in per_class.values() if m["support"] > 0]
    return {k: float(np.mean([m[k] for m in present])) if present else 0.0 for k in ("precision", "recall", "f1")}


def calibration_summary(logits, labels, temperature, n_bins=10):
    """ECE, NLL and reliability bins of the raw softmax (T = 1) and of the temperature-scaled one."""
    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    out = {"temperature": float(temperature), "bins": n_bins}
    for name, t in (("uncalibrated", 1.0), ("calibrated", float(temperature))):
        probs = torch.softmax(logits / t, dim=1)
        conf, pred = probs.max(1)
        correct = (pred == labels).numpy()
        out[name] = {
            "ece": expected_calibration_error(conf.numpy(), correct, n_bins),
            "nll": nll(logits, labels, t),
            "mean_confidence": float(conf.mean()) if len(conf) else None,
            "reliability": reliability_bins(conf.numpy(), correct, n_bins),
        }
    return out


def uncertain_summary(probabilities, y_true, threshold, answered=None):
    """How many predictions fall below the confidence threshold, and how often each group is right (an image
    without an answer is uncertain and wrong)."""
    probs = np.asarray(probabilities, float).reshape(len(y_true), -1)
    answered = np.ones(len(y_true), bool) if answered is None else np.asarray(answered, bool)
    conf, correct = np.where(answered, probs.max(1), 0.0), (probs.argmax(1) == np.asarray(y_true)) & answered
    flagged = conf < threshold
    acc = lambda m: float(correct[m].mean()) if m.any() else None  # noqa: E731
    return {
        "threshold": float(threshold),
        "count": int(flagged.sum()),
        "accuracy_confident": acc(~flagged),
        "accuracy_uncertain": acc(flagged),
        "errors_flagged": int((flagged & ~correct).sum()),
        "errors": int((~correct).sum()),
    }


def _auroc(wrong, score):
    """AUROC of `score` for telling wrong predictions from right ones; None when only one outcome occurs."""
    if len(wrong) == 0 or wrong.all() or not wrong.any():
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(wrong.astype(int), score))


def flag_summary(probabilities, y_true, threshold, unfamiliarity=None, answered=None):
    """How the two warnings do on a labelled folder: the share of images flagged uncertain (calibrated top
    probability < threshold), unfamiliar (unfamiliarity > 1) and either; how many of the mistakes each flag
    catches; the accuracy on the images no flag touches (selective accuracy); and the AUROC of each score for
    telling wrong answers from right ones. Unfamiliar entries are None for model files without the score."""
    probs = np.asarray(probabilities, float).reshape(len(y_true), -1)
    answered = np.ones(len(y_true), bool) if answered is None else np.asarray(answered, bool)
    conf, wrong = np.where(answered, probs.max(1), 0.0), (probs.argmax(1) != np.asarray(y_true, int)) | ~answered
    uncertain = conf < threshold
    known = unfamiliarity is not None
    if known:  # no answer (no hand found) counts as unfamiliar, and as the least familiar
        unfamiliarity = np.where(answered, np.nan_to_num(np.asarray(unfamiliarity, float), nan=1e9), 1e9)
    unf = unfamiliarity > 1 if known else np.zeros(len(wrong), bool)
    either = uncertain | unf
    share = lambda m: float(m.mean()) if len(m) else None  # noqa: E731
    return {
        "n": int(len(wrong)),
        "errors": int(wrong.sum()),
        "share_uncertain": share(uncertain),
        "share_unfamiliar": share(unf) if known else None,
        "share_either": share(either),
        "errors_flagged": {
            "uncertain": int((wrong & uncertain).sum()),
            "unfamiliar": int((wrong & unf).sum()) if known else None,
            "either": int((wrong & either).sum()),
        },
        "selective_accuracy": float(1 - wrong[~either].mean()) if (~either).any() else None,
        "n_not_flagged": int((~either).sum()),
        "auroc_unfamiliarity": _auroc(wrong, np.asarray(unfamiliarity, float)) if known else None,
        "auroc_low_confidence": _auroc(wrong, 1 - conf),
    }


def evaluation_from_logits(
    logits,
    y_true,
    classes,
    temperature=1.0,
    uncertain_below=DEFAULT_UNCERTAIN_BELOW,
    unfamiliarity=None,
    answered=None,
    **info,
):
    """An Evaluation from logits. answered: for landmark models, which images had a hand; the others count as
    wrong (no answer) and are left out of the calibration figures, which are about the answers given."""
    logits = torch.as_tensor(logits, dtype=torch.float32)
    probs = torch.softmax(logits / temperature, dim=1)
    y_true = [int(y) for y in y_true]
    mask = (
        torch.ones(len(y_true), dtype=torch.bool) if answered is None else torch.as_tensor(answered, dtype=torch.bool)
    )
    probs[~mask] = 0.0  # no answer: no probability for any class
    y_pred = torch.where(mask, probs.argmax(1), -1).tolist() if len(y_true) else []
    accuracy, per_class, cm = metrics_from_predictions(y_true, y_pred, classes)
    correct = sum(int(a == b) for a, b in zip(y_true, y_pred))
    given = mask.nonzero().flatten()
    y_given = [y_true[i] for i in given.tolist()]
    hands = None if answered is None else hand_summary(mask.numpy(), np.asarray(y_true), np.asarray(y_pred))
    return Evaluation(
        classes,
        accuracy,
        len(y_true),
        per_class,
        cm,
        probabilities=probs.tolist(),
        y_true=y_true,
        accuracy_ci=wilson_interval(correct, len(y_true)),
        macro=macro_average(per_class),
        calibration=calibration_summary(logits[given], y_given, temperature),
        uncertain=uncertain_summary(probs.numpy(), y_true, uncertain_below, answered),
        unfamiliarity=None if unfamiliarity is None else [float(u) for u in unfamiliarity],
        flags=flag_summary(probs.numpy(), y_true, uncertain_below, unfamiliarity, answered),
        answered=None if answered is None else mask.tolist(),
        hands=hands,
        **info,
    )


def hand_summary(found, y_true, y_pred):
    """Coverage (images with a hand found) and the accuracy on those, for landmark models."""
    n_found = int(found.sum())
    return {
        "n_found": n_found,
        "coverage": float(found.mean()) if len(found) else None,
        "accuracy_where_found": float((y_pred[found] == y_true[found]).mean()) if n_found else None,
    }


def evaluate_folder(classifier, data_dir, tta=None, subject_mask="auto"):
    """Evaluate a loaded Classifier on DATA_DIR (class folders must be among the model's classes).

    tta: True/False forces flip test-time augmentation on/off; None uses what the model file says.
    subject_mask: how to find the subject for "does it look at the subject?" (data.subjects.HOW; "off": not
    measured, no explanation pass).
    """
    start = time.perf_counter()
    folder = scan_folder(data_dir, classes=classifier.classes, min_classes=1)
    data = load_folder(folder, classifier.image_size, require_every_class=False)
    used_tta = classifier.tta if tta is None else bool(tta)
    maps = None
    if hasattr(classifier, "answers_and_maps") and subject_mask != "off":  # the maps come from the same pass
        logits, unfamiliarity, found, maps = classifier.answers_and_maps(data.images, tta=used_tta)
    elif hasattr(classifier, "answers"):
        logits, unfamiliarity, found = classifier.answers(data.images, tta=used_tta)
    else:  # an exported model: every image is answered
        (logits, unfamiliarity), found = classifier.logits_and_unfamiliarity(data.images, tta=used_tta), None
    if found is not None and unfamiliarity is None:  # a landmark model: unfamiliar means no hand found
        unfamiliarity = torch.zeros(len(logits))
    y_pred = logits.argmax(1) if found is None else torch.where(torch.as_tensor(found.found), logits.argmax(1), -1)
    looking = looking_summary(data.images, data.labels.tolist(), y_pred, subject_mask, maps, found)
    return evaluation_from_logits(
        logits,
        data.labels.tolist(),
        classifier.classes,
        classifier.temperature,
        classifier.uncertain_below,
        unfamiliarity=None if unfamiliarity is None else unfamiliarity.tolist(),
        answered=None if found is None else found.found.tolist(),
        skipped=data.skipped,
        paths=[str(p) for p in data.paths],
        data_dir=str(data_dir),
        model_path=getattr(classifier, "path", None),
        tta=used_tta,
        looking=looking,
        seconds=time.perf_counter() - start,
    )
