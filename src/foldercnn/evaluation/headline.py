"""The one accuracy figure to show first (serve page, GET /model, the report's top card), stated honestly:
the test accuracy when RUN_DIR/evaluation.json lies beside the model file (from `foldercnn evaluate MODEL
TEST_FOLDER --out RUN_DIR`), else the validation accuracy, labelled as the optimistic figure it is."""

import math
from pathlib import Path

from .. import run_folder as rf
from ..files import read_json

VALIDATION_LABEL = "validation, from the training folder: optimistic"


def read_evaluation(model_path):
    """The evaluation.json beside MODEL_PATH if it was made for a model file of that name, else None."""
    if model_path is None:
        return None
    model_path = Path(model_path)
    ev = read_json(model_path.parent / rf.EVALUATION)
    if not usable_evaluation(ev):
        return None
    if ev.get("model") and Path(str(ev["model"])).name != model_path.name:
        return None  # made for another model file in the same folder
    return ev


def _number(x, lo, hi):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def usable_evaluation(ev):
    """An evaluation.json (written by foldercnn, but a file anyone can edit) with the figures shown from it."""
    return (
        isinstance(ev, dict)
        and _number(ev.get("accuracy"), 0, 1)
        and isinstance(ev.get("n"), int)
        and not isinstance(ev.get("n"), bool)
        and ev["n"] >= 1
        and isinstance(ev.get("accuracy_ci95"), list)
        and len(ev["accuracy_ci95"]) == 2
        and all(_number(x, 0, 1) for x in ev["accuracy_ci95"])
        and isinstance(ev.get("classes"), list)
        and all(isinstance(c, str) for c in ev["classes"])
        and isinstance(ev.get("per_class"), dict)
        and isinstance(ev.get("confusion"), list)
        and all(isinstance(ev.get(k, {}), dict) for k in ("calibration", "uncertain", "flags"))
        and isinstance(ev.get("mistakes", []), list)
    )


def headline(meta, model_path=None, evaluation=None):
    """{"source": "test"|"validation"|None, "accuracy", "n", "folder", "label"}."""
    ev = evaluation if evaluation is not None else read_evaluation(model_path)
    if ev:
        folder = ev.get("data_dir") or "a test folder"
        return {
            "source": "test",
            "accuracy": float(ev["accuracy"]),
            "accuracy_ci95": ev.get("accuracy_ci95"),
            "n": int(ev["n"]),
            "folder": folder,
            "label": f"test accuracy on {int(ev['n'])} images from {folder}",
        }
    m = meta.get("metrics") or {}
    if "val_accuracy" in m:
        return {
            "source": "validation",
            "accuracy": float(m["val_accuracy"]),
            "accuracy_ci95": None,
            "n": m.get("n_val"),
            "folder": (meta.get("data") or {}).get("train_dir"),
            "label": f"{VALIDATION_LABEL} ({m.get('n_val', '?')} images)",
        }
    return {
        "source": None,
        "accuracy": None,
        "accuracy_ci95": None,
        "n": None,
        "folder": None,
        "label": "no accuracy measured yet",
    }
