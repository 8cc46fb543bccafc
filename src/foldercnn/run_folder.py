"""The run folder: the one place that names its files, and the training history's CSV format.

RUN_DIR/model.safetensors   the model file (weights + metadata)
RUN_DIR/history.csv         one row per epoch
RUN_DIR/options.json        the run's options (training/options.py)
RUN_DIR/evaluation.json     the last `evaluate --out RUN_DIR` (its first folder: the test folder)
RUN_DIR/other_folders.json  that evaluation's further folders, one summary row each
RUN_DIR/report.html         the self-contained report
RUN_DIR/*.png               the figures
"""

import csv
import io
from pathlib import Path

from .files import write_text

MODEL = "model.safetensors"
HISTORY = "history.csv"
OPTIONS = "options.json"
EVALUATION = "evaluation.json"
OTHER_FOLDERS = "other_folders.json"
REPORT = "report.html"
SAMPLES = "samples.png"
AUGMENTATIONS = "augmentations.png"
CURVES = "curves.png"
CONFUSION = "confusion.png"
MISTAKES = "mistakes.png"
CALIBRATION = "calibration.png"

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


def path(run_dir, name):
    return Path(run_dir) / name


def write_history(file, history):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{h[k]:.6f}" if isinstance(h[k], float) else h[k]) for k in HISTORY_FIELDS})
    write_text(file, buf.getvalue())


def read_history(file):
    with open(file, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
