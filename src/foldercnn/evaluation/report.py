"""The run's report: evaluation figures (confusion.png, mistakes.png, calibration.png, evaluation.json) and
one self-contained report.html (images embedded, no external assets) built from the files in a run folder."""
import base64
import datetime
import html
import json
import math
from pathlib import Path

import numpy as np

from .. import run_folder as rf
from ..data.images import ImageDecodeError, decode
from ..files import check_out_dir, write_text
from ..models.file import load_model
from ..models.inference import load
from ..models.registry import summary
from ..plots import confusion_matrix_plot, mistakes_gallery, reliability_diagram
from ..version import __version__
from .headline import VALIDATION_LABEL, usable_evaluation
from .metrics import FOLDER_TABLE_HEADER, evaluate_folder, folder_row, folder_table_cells, table_header

MISTAKE_THUMB = 160


def _thumbnail(path):
    try:
        return decode(path, MISTAKE_THUMB)
    except (ImageDecodeError, OSError):  # moved or changed since the evaluation: a grey square
        return np.full((MISTAKE_THUMB, MISTAKE_THUMB, 3), 200, np.uint8)


def save_evaluation(ev, out_dir, n_mistakes=12):
    """evaluation.json plus confusion.png, mistakes.png and calibration.png in OUT_DIR."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = Path(ev.data_dir).name if ev.data_dir else "evaluation"
    write_text(out_dir / rf.EVALUATION, json.dumps(ev.to_dict(), indent=1))
    confusion_matrix_plot(ev.confusion, ev.classes, out_dir / rf.CONFUSION,
                          title=f"Confusion matrix on {name}/ ({ev.n} images)")
    mistakes = ev.mistakes(n_mistakes)
    mistakes_gallery([_thumbnail(m["path"]) for m in mistakes], mistakes, out_dir / rf.MISTAKES, ev.n)
    reliability_diagram(ev.calibration, out_dir / rf.CALIBRATION,
                        title=f"Is the confidence right? Reliability on {name}/ ({ev.n} images)")
    return out_dir


def evaluate_to_folder(model_path, data_dirs, out_dir=None, tta=None):
    """Evaluate a model file on one or more labelled folders; with OUT_DIR also write the figures and (re)write
    report.html there. The first folder is the test folder (evaluation.json, figures, the headline); the others
    ("other photos": other people, rooms, cameras) get one summary row each in other_folders.json.

    Returns (list of Evaluations, report path or None).
    """
    data_dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs)
    if out_dir is not None:
        check_out_dir(out_dir, data_dirs)
    classifier = load(model_path)
    evs = [evaluate_folder(classifier, d, tta=tta) for d in data_dirs]
    if out_dir is None:
        return evs, None
    save_evaluation(evs[0], out_dir)
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


# ---- report.html ----

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1000px;
       margin: 0 auto; padding: 1rem 1.2rem 3rem; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem;
     margin-top: 2.2rem; } h3 { margin-bottom: .3rem; }
.sub { color: #666; margin-top: 0; } .note { color: #555; font-size: .92rem; }
.cards { display: flex; flex-wrap: wrap; gap: .8rem; margin: 1rem 0; }
.card { border: 1px solid #ddd; border-radius: 8px; padding: .6rem .9rem; min-width: 10rem; flex: 1; }
.card b { display: block; font-size: 1.5rem; } .card span { color: #555; font-size: .88rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .92rem; }
th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; } th { background: #f4f4f4; }
img { max-width: 100%; height: auto; display: block; margin: .6rem 0; border: 1px solid #eee; }
.scroll { overflow-x: auto; max-width: 100%; }
code { overflow-wrap: anywhere; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; font-size: .8rem; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5rem .8rem; }
.missing { color: #888; font-style: italic; }
@media print { body { max-width: none; font-size: 11pt; } h2 { break-before: auto; } img, table, .card
  { break-inside: avoid; } details > *:not(summary) { display: block; } }
"""


def _esc(x):
    return html.escape(str(x))


def _img(path, alt):
    path = Path(path)
    if not path.is_file():
        return f'<p class="missing">({_esc(path.name)} not found in the run folder)</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_esc(alt)}">'


def _table(header, rows):
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in r) + "</tr>" for r in rows)
    # the wrapper scrolls a wide table sideways on a phone instead of widening the whole page
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _pct(x, digits=1):
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _card(value, label):
    return f'<div class="card"><b>{_esc(value)}</b><span>{_esc(label)}</span></div>'


def _finite(value):
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def _read_history(path):
    try:
        return rf.read_history(path)
    except (OSError, ValueError, KeyError):
        return []


def _summary_cards(meta, ev):
    cards = []
    if ev:
        lo, hi = ev["accuracy_ci95"]
        cards.append(_card(_pct(ev["accuracy"]), f"test accuracy on {ev['n']} images from {ev.get('data_dir')} "
                                                 f"(95% interval {_pct(lo)}–{_pct(hi)})"))
        cards.append(_card(f"{ev['calibration']['calibrated']['ece']:.3f}",
                           "expected calibration error on test (0 is perfect)"))
        f = ev.get("flags") or {}
        if f.get("share_unfamiliar") is not None:
            cards.append(_card(_pct(f["share_unfamiliar"]), "of test images flagged unfamiliar (not like the "
                                                            "training images)"))
    m = meta.get("metrics", {})
    if "val_accuracy" in m:
        cards.append(_card(_pct(m["val_accuracy"]), f"{VALIDATION_LABEL} ({m.get('n_val', '?')} images, "
                                                     f"epoch {m.get('epoch', '?')})"))
    t = meta.get("timing", {})
    if t:
        cards.append(_card(f"{t.get('data_seconds', 0) + t.get('train_seconds', 0):.0f} s",
                           f"to decode and train ({t.get('data_seconds', 0):.0f} s decoding)"))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _data_section(run, meta):
    d = meta.get("data") or {}
    parts = ["<h2>1. The data</h2>"]
    if d:
        parts.append(f"<p>Training folder <code>{_esc(d.get('train_dir'))}</code>; validation: "
                     f"{_esc(d.get('validation'))}.</p>")
        counts = d.get("counts", {})
        rows = [(c, v[0], v[1]) for c, v in counts.items()]
        rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
        parts.append(_table(["class", "training images", "validation images"], rows))
        if d.get("n_skipped"):
            parts.append(f'<p class="warn">{d["n_skipped"]} file(s) could not be used and were skipped:</p>')
            parts.append(_table(["file", "reason"], [(s["path"], s["reason"]) for s in d.get("skipped", [])]))
    else:
        parts.append(f"<p>Classes: {_esc(', '.join(meta.get('classes', [])))}.</p>")
    parts.append("<h3>Sample images</h3>" + _img(run / rf.SAMPLES, "sample training images per class"))
    return "".join(parts)


def _augmentation_section(run, meta):
    aug = (meta.get("recipe") or {}).get("augment") or {}
    desc = ", ".join(f"{k} {v}" for k, v in aug.items() if v) or "none"
    return ("<h2>2. Augmentation</h2><p>Each training step sees randomly changed copies of the images, so the "
            f"model learns the class and not the exact picture. Settings: {_esc(desc)}.</p>"
            + _img(run / rf.AUGMENTATIONS, "original training images and random augmentations of them"))


def _model_section(meta, model_summary):
    r = meta.get("recipe") or {}
    keys = ["name", "model", "image_size", "epochs", "batch_size", "optimizer", "lr", "schedule",
            "weight_decay", "label_smoothing", "keep"]
    rows = [(k, r[k]) for k in keys if k in r]
    rows += [("seed", meta.get("seed")), ("precision", meta.get("precision")),
             ("test-time augmentation (flip)", meta.get("tta")), ("input size", f"{meta.get('image_size')} px"),
             ("classes (in output order)", ", ".join(meta.get("classes", [])))]
    out = ["<h2>3. The model</h2>", f"<p>{_esc(r.get('description', ''))}</p>", _table(["setting", "value"], rows)]
    if model_summary:
        out.append(f"<details><summary>Layers and parameters</summary><pre>{_esc(model_summary)}</pre></details>")
    return "".join(out)


def _training_section(run, meta, history):
    m, t = meta.get("metrics", {}), meta.get("timing", {})
    out = ["<h2>4. Training</h2>",
           f"<p>{m.get('epochs_run', len(history))} epochs on {m.get('n_train', '?')} images; the kept model is "
           f"epoch {m.get('epoch', '?')} (highest validation accuracy"
           f"{'' if (meta.get('recipe') or {}).get('keep') != 'last' else '; this recipe keeps the last epoch'}). "
           f"Decoding took {t.get('data_seconds', 0):.1f} s and training {t.get('train_seconds', 0):.1f} s."
           + (" Training was interrupted." if m.get("interrupted") else "") + "</p>",
           _img(run / rf.CURVES, "accuracy and loss per epoch for training and validation")]
    if history:
        rows = [(h["epoch"], f"{h['loss']:.4f}", f"{h['accuracy']:.4f}", f"{h['val_loss']:.4f}",
                 f"{h['val_accuracy']:.4f}", f"{h['seconds']:.1f}") for h in history]
        out.append("<details><summary>Every epoch</summary>" + _table(
            ["epoch", "loss", "accuracy", "val loss", "val accuracy", "seconds"], rows) + "</details>")
    return "".join(out)


def _calibration_text(meta, ev):
    cal = meta.get("calibration") or {}
    out = []
    if cal:
        out.append(f"<p>The model's probabilities are divided by a temperature fitted on the validation split "
                   f"(never on test images): T = {cal['temperature']:.3f} ({_esc(cal.get('rule', ''))}). On "
                   f"validation it changed the negative log-likelihood from {cal['val_nll_before']:.4f} to "
                   f"{cal['val_nll_after']:.4f}. Predictions below {_pct(cal['uncertain_below'], 0)} are "
                   f"marked <b>uncertain</b>.</p>")
    if ev:
        c = ev["calibration"]
        u = ev["uncertain"]
        out.append(_table(["on the test images", "raw softmax (T = 1)", f"temperature scaled (T = {c['temperature']:.2f})"],
                          [("expected calibration error", f"{c['uncalibrated']['ece']:.4f}", f"{c['calibrated']['ece']:.4f}"),
                           ("negative log-likelihood", f"{c['uncalibrated']['nll']:.4f}", f"{c['calibrated']['nll']:.4f}"),
                           ("mean confidence", _pct(c["uncalibrated"]["mean_confidence"]),
                            _pct(c["calibrated"]["mean_confidence"])),
                           ("accuracy", _pct(ev["accuracy"]), _pct(ev["accuracy"]))]))
        out.append(f"<p>{u['count']} of {ev['n']} test predictions are marked uncertain; they hold "
                   f"{u['errors_flagged']} of the {u['errors']} mistakes. Accuracy of the confident ones: "
                   f"{_pct(u['accuracy_confident'])}; of the uncertain ones: {_pct(u['accuracy_uncertain'])}.</p>")
    return "".join(out)


def _flags_text(meta, ev):
    sec = meta.get("unfamiliar")
    out = []
    if sec:
        out.append(f"<p>An image is marked <b>unfamiliar</b> when its features (the network's last layer before "
                   f"the classifier) lie far from those of every class of training images: Mahalanobis distance "
                   f"over {sec['feature_dim']} features (rank {sec['rank']}), threshold {sec['threshold']:.4g}, "
                   f"the {_esc(sec['rule'])}. It reliably notices images from another kind of source than the "
                   f"training folder; within one kind of image it is a weak sign of a wrong answer, and "
                   f"<i>uncertain</i> is the better one.</p>")
    elif (meta.get("preprocessing") or {}).get("hands"):
        out.append("<p>This model classifies the hand MediaPipe Hands finds in a photo: an image is marked "
                   "<b>unfamiliar</b> when no hand is found, and then it gets no answer at all. (How far a hand's "
                   "landmarks lie from the training hands flagged right and wrong answers alike on real photos, so "
                   "it is not used.)</p>")
    else:
        out.append('<p class="missing">This model file has no unfamiliarity score (made by an older '
                   "foldercnn); retrain to get one.</p>")
    f = (ev or {}).get("flags")
    if f:
        e = f["errors_flagged"]
        auc = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        out.append(_table(["on the test images", "share of images", "mistakes flagged"],
                          [("uncertain", _pct(f["share_uncertain"]), f"{e['uncertain']} of {f['errors']}"),
                           ("unfamiliar", _pct(f["share_unfamiliar"]),
                            "n/a" if e["unfamiliar"] is None else f"{e['unfamiliar']} of {f['errors']}"),
                           ("either", _pct(f["share_either"]), f"{e['either']} of {f['errors']}")]))
        out.append(f"<p>Accuracy on the {f['n_not_flagged']} images neither flag touches: "
                   f"{_pct(f['selective_accuracy'])}. Telling wrong answers from right ones (AUROC, 0.5 is "
                   f"chance): low confidence {auc(f['auroc_low_confidence'])}, unfamiliarity "
                   f"{auc(f['auroc_unfamiliarity'])}.</p>")
    return "".join(out)


def _evaluation_section(run, meta, ev):
    out = ["<h2>5. How good is it? The test images</h2>"]
    if not ev:
        out.append('<p class="missing">No test evaluation yet. Run <code>foldercnn evaluate '
                   f'{_esc(run / rf.MODEL)} TEST_FOLDER --out {_esc(run)}</code> with images the model '
                   "never saw, and this section fills in.</p>")
        out.append("<h3>Calibration</h3>" + _calibration_text(meta, None))
        out.append("<h3>Warnings: uncertain and unfamiliar</h3>" + _flags_text(meta, None))
        return "".join(out)
    lo, hi = ev["accuracy_ci95"]
    out.append(f"<p>On <b>{ev['n']}</b> images from <code>{_esc(ev['data_dir'])}</code>, which played no part in "
               f"training or in choosing the model, it is right <b>{ev['n_correct']}</b> times: accuracy "
               f"<b>{_pct(ev['accuracy'], 2)}</b>, and with 95% confidence the true accuracy on images like these "
               f"lies between {_pct(lo)} and {_pct(hi)} (Wilson interval)."
               + (f" {ev['n_skipped']} file(s) could not be read and were skipped." if ev["n_skipped"] else "")
               + (" Predictions averaged over each image and its mirror image (--tta)." if ev.get("tta") else "")
               + "</p>")
    rows = [(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"])
            for c, m in ev["per_class"].items()]
    mac = ev.get("macro_avg") or {}
    if mac:
        rows.append(("macro average", f"{mac['precision']:.3f}", f"{mac['recall']:.3f}", f"{mac['f1']:.3f}", ev["n"]))
    out.append(_table(["class", "precision", "recall", "F1", "images"], rows))
    out.append('<p class="note">Precision: of the images called this class, the share that were. Recall: of the '
               "images of this class, the share found.</p>")
    out.append("<h3>Confusion matrix</h3>")
    out.append(_table(["true \\ predicted"] + ev["classes"], [[c] + row for c, row in zip(ev["classes"], ev["confusion"])]))
    out.append(_img(run / rf.CONFUSION, "confusion matrix"))
    out.append("<h3>The most confident mistakes</h3>" + _img(run / rf.MISTAKES, "wrongly classified test images"))
    out.append("<h3>Calibration: does 90% sure mean right 9 times in 10?</h3>" + _calibration_text(meta, ev))
    out.append(_img(run / rf.CALIBRATION, "reliability diagram before and after temperature scaling"))
    out.append("<h3>Warnings: uncertain and unfamiliar</h3>" + _flags_text(meta, ev))
    return "".join(out)


def _other_folders_section(run, ev):
    rows = _read_json(run / rf.OTHER_FOLDERS)
    if not ev or not isinstance(rows, list) or not _finite(rows):
        return ""
    rows = [r for r in rows if isinstance(r, dict) and isinstance(r.get("accuracy"), (int, float))
            and isinstance(r.get("accuracy_ci95"), list) and len(r["accuracy_ci95"]) == 2 and "n" in r]
    if not rows:
        return ""
    all_rows = [folder_row(ev)] + rows
    header = table_header(all_rows)
    table = [folder_table_cells(r, len(header) > len(FOLDER_TABLE_HEADER)) for r in all_rows]
    worst = min(rows, key=lambda r: r["accuracy"])
    gap = ev["accuracy"] - worst["accuracy"]
    note = (f'<p class="warn">On <code>{_esc(worst["data_dir"])}</code> it is right {_pct(worst["accuracy"])} of the '
            f"time, {100 * gap:.0f} points below the test folder: photos unlike the training folder (other people, "
            "rooms, cameras) are where this model is weak. Add some of them to the training folder.</p>"
            if gap > 0.05 else "")
    return ("<h2>6. How it does on other photos</h2>"
            "<p>The test folder above usually comes from the same source as the training folder. These folders "
            "were evaluated with it, to show how the model does on photos from elsewhere.</p>"
            + _table(header, table) + note +
            '<p class="note">ECE: expected calibration error of the calibrated probabilities (0 is perfect). '
            "Flagged: uncertain or unfamiliar. Accuracy not flagged: on the images neither warning touches.</p>")


def build_report(run_dir, model_path=None):
    """report.html as a string, from what RUN_DIR holds (model file, history, PNGs, evaluation.json)."""
    run = Path(run_dir)
    model_path = Path(model_path) if model_path else run / rf.MODEL
    model, meta = load_model(model_path)
    try:
        model_summary = summary(model, int(meta["image_size"]))
    except RuntimeError:
        model_summary = None
    ev = _read_json(run / rf.EVALUATION)
    unusable = ev is not None and not (usable_evaluation(ev) and _finite(ev))
    if unusable:  # an edited or damaged file: ignored, and the report says so
        ev = None
    history = _read_history(run / rf.HISTORY)
    title = f"foldercnn report: {run.resolve().name}"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [f"<h1>{_esc(title)}</h1>",
            f'<p class="sub">Model <code>{_esc(model_path)}</code>: {len(meta["classes"])} classes '
            f"({_esc(', '.join(meta['classes']))}), recipe <b>{_esc((meta.get('recipe') or {}).get('name', '?'))}</b>. "
            f"Made {when} by foldercnn {__version__}.</p>",
            _summary_cards(meta, ev),
            (f'<p class="warn">{_esc(rf.EVALUATION)} in this folder is not a usable evaluation (edited or damaged: a '
             "figure missing, of the wrong type or not finite), so it is left out; run <code>foldercnn evaluate "
             "MODEL TEST_FOLDER --out RUN_DIR</code> again.</p>" if unusable else ""),
            '<p class="note">Validation images come from the training folder, so they are often easier than '
            "new photos (same people, same lighting). The test figures below are the ones to quote.</p>",
            _data_section(run, meta), _augmentation_section(run, meta), _model_section(meta, model_summary),
            _training_section(run, meta, history), _evaluation_section(run, meta, ev),
            _other_folders_section(run, ev),
            "<h2>Use it</h2><pre>" + _esc(f"foldercnn predict {model_path} photo.jpg\n"
                                          f"foldercnn serve {model_path}\n"
                                          f"foldercnn report {run}") + "</pre>"]
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_dir, model_path=None):
    """Write RUN_DIR/report.html (atomically) and return its path."""
    path = Path(run_dir) / rf.REPORT
    write_text(path, build_report(run_dir, model_path))
    return path
