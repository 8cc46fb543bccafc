"""The run's report: evaluation figures (confusion.png, mistakes.png, calibration.png, evaluation.json) and
one self-contained report.html (images embedded, no external assets) built from the files in a run folder."""

import json
import math
from pathlib import Path

import numpy as np

from .. import run_folder as rf
from ..data.images import ImageDecodeError, Letterbox, decode
from ..files import check_out_dir, read_json, write_text
from ..models.file import load_model, read_metadata
from ..models.inference import load
from ..models.summary import summary
from ..plots import confusion_matrix_plot, mistakes_gallery, reliability_diagram
from .headline import usable_evaluation
from .metrics import evaluate_folder, folder_row
from .overlays import explained_picture
from .report_html import render_report

MISTAKE_THUMB = 160


def _thumbnail(path, size=MISTAKE_THUMB):
    try:
        return decode(path, size)
    except (ImageDecodeError, OSError):  # moved or changed since the evaluation: a grey square
        return np.full((MISTAKE_THUMB, MISTAKE_THUMB, 3), 200, np.uint8)


def mistake_pictures(mistakes, classifier=None):
    """The mistakes' images; with a classifier that can explain, each with where it looked (heat map or skeleton:
    a hands model's thumbnails are letterboxed, as it saw them)."""
    explains = getattr(classifier, "explains", None) if mistakes else None
    size = Letterbox(MISTAKE_THUMB) if explains == "skeleton" else MISTAKE_THUMB
    thumbs = [_thumbnail(m["path"], size) for m in mistakes]
    if not explains:
        return thumbs
    arrays = np.stack([decode_or(m["path"], classifier.image_size, t) for m, t in zip(mistakes, thumbs)])
    predictions, maps = classifier.explain_arrays(arrays)
    return [
        explained_picture(t, p, None if maps is None else maps[i], caption=False, letterboxed=True)
        for i, (t, p) in enumerate(zip(thumbs, predictions))
    ]


def decode_or(path, size, fallback):
    try:
        return decode(path, size)
    except (ImageDecodeError, OSError):
        return decode(fallback, size)


def save_evaluation(ev, out_dir, n_mistakes=12, classifier=None):
    """evaluation.json plus confusion.png, mistakes.png (with where `classifier` looked, when given) and
    calibration.png in OUT_DIR."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(ev.data_dir).name if ev.data_dir else "evaluation"
    write_text(out_dir / rf.EVALUATION, json.dumps(ev.to_dict(), indent=1))
    confusion_matrix_plot(
        ev.confusion, ev.classes, out_dir / rf.CONFUSION, title=f"Confusion matrix on {name}/ ({ev.n} images)"
    )
    mistakes = ev.mistakes(n_mistakes)
    mistakes_gallery(mistake_pictures(mistakes, classifier), mistakes, out_dir / rf.MISTAKES, ev.n)
    reliability_diagram(
        ev.calibration,
        out_dir / rf.CALIBRATION,
        title=f"Is the confidence right? Reliability on {name}/ ({ev.n} images)",
    )
    return out_dir


def evaluate_to_folder(model_path, data_dirs, out_dir=None, tta=None, subject_mask="auto"):
    """Evaluate a model file on one or more labelled folders; with OUT_DIR also write the figures and (re)write
    report.html there. The first folder is the test folder (evaluation.json, figures, the headline); the others
    ("other photos": other people, rooms, cameras) get one summary row each in other_folders.json.

    Returns (list of Evaluations, report path or None).
    """
    data_dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    if out_dir is not None:
        check_out_dir(out_dir, data_dirs)
    classifier = load(model_path)
    evs = [evaluate_folder(classifier, d, tta=tta, subject_mask=subject_mask) for d in data_dirs]
    if out_dir is None:
        return evs, None
    save_evaluation(evs[0], out_dir, classifier=classifier)
    save_other_folders(evs[1:], out_dir)
    return evs, write_report(out_dir, model_path)


def save_other_folders(evs, out_dir):
    """other_folders.json: one summary row per further folder (none: the file goes, as rows from an earlier
    evaluation would sit beside a test figure they were not measured with)."""
    others = Path(out_dir) / rf.OTHER_FOLDERS
    if evs:
        write_text(others, json.dumps([folder_row(ev.to_dict()) for ev in evs], indent=1))
    else:
        others.unlink(missing_ok=True)


# ---- report.html: what is read from the run folder (report_html.py renders it) ----


def _finite(value):
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _read_history(path):
    try:
        return rf.read_history(path)
    except (OSError, ValueError, KeyError):
        return []


def _read_other_folders(run):
    """The usable rows of RUN_DIR/other_folders.json ([] when it is missing, damaged or not finite)."""
    rows = read_json(run / rf.OTHER_FOLDERS)
    if not isinstance(rows, list) or not _finite(rows):
        return []
    return [
        r
        for r in rows
        if isinstance(r, dict)
        and isinstance(r.get("accuracy"), (int, float))
        and isinstance(r.get("accuracy_ci95"), list)
        and len(r["accuracy_ci95"]) == 2
        and "n" in r
    ]


def build_report(run_dir, model_path=None, model_summary=None):
    """report.html as a string, from what RUN_DIR holds (model file, history, PNGs, evaluation.json).
    model_summary: the network's summary when the caller has it (training), else the model file is loaded."""
    run = Path(run_dir)
    model_path = Path(model_path) if model_path else run / rf.MODEL
    if model_summary is not None:
        meta = read_metadata(model_path)
    else:
        model, meta = load_model(model_path)
        try:
            model_summary = summary(model, int(meta["image_size"]))
        except RuntimeError:
            model_summary = None
    ev = read_json(run / rf.EVALUATION)
    unusable = ev is not None and not (usable_evaluation(ev) and _finite(ev))
    if unusable:  # an edited or damaged file: ignored, and the report says so
        ev = None
    others = _read_other_folders(run) if ev else []  # beside a test evaluation only
    return render_report(
        run,
        model_path,
        meta,
        ev,
        model_summary=model_summary,
        history=_read_history(run / rf.HISTORY),
        other_rows=others,
        unusable=unusable,
    )


def write_report(run_dir, model_path=None, model_summary=None):
    """Write RUN_DIR/report.html (atomically) and return its path."""
    path = Path(run_dir) / rf.REPORT
    write_text(path, build_report(run_dir, model_path, model_summary))
    return path
