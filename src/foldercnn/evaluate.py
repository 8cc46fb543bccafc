"""Measure a model file on a labelled folder: accuracy, per-class metrics, confusion matrix."""
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from .data import load_folder, scan_folder


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
    probabilities: list = field(default_factory=list)

    def to_dict(self):
        return {"accuracy": self.accuracy, "n": self.n, "n_skipped": len(self.skipped),
                "classes": self.classes, "per_class": self.per_class, "confusion": self.confusion,
                "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped]}


def metrics_from_predictions(y_true, y_pred, classes):
    labels = list(range(len(classes)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
                 for i, c in enumerate(classes)}
    cm = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    accuracy = float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0
    return accuracy, per_class, cm


def evaluate_folder(classifier, data_dir):
    """Evaluate a loaded Classifier on DATA_DIR (class folders must be among the model's classes)."""
    folder = scan_folder(data_dir, classes=classifier.classes, min_classes=1)
    data = load_folder(folder, classifier.image_size, require_every_class=False)
    probs = classifier.probabilities(data.images)
    y_true, y_pred = data.labels.tolist(), probs.argmax(1).tolist()
    accuracy, per_class, cm = metrics_from_predictions(y_true, y_pred, classifier.classes)
    return Evaluation(classifier.classes, accuracy, len(y_true), per_class, cm, data.skipped,
                      [str(p) for p in data.paths], y_true, probs.tolist())


def format_evaluation(ev):
    w = max(len(c) for c in ev.classes + ["class"]) + 2
    lines = [f"accuracy {ev.accuracy:.4f} on {ev.n} images ({ev.accuracy * ev.n:.0f} correct); "
             f"{len(ev.skipped)} skipped", "",
             f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for c, m in ev.per_class.items():
        lines.append(f"{c:<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)",
              " " * w + "".join(f"{c[:9]:>10}" for c in ev.classes)]
    for c, row in zip(ev.classes, ev.confusion):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>10}" for v in row))
    for p, r in ev.skipped[:10]:
        lines.append(f"skipped {p}: {r}")
    return "\n".join(lines)
