"""report.html's HTML: the page's style and sections, rendered from what report.py read from a run folder
(the PNGs are embedded as they are rendered)."""

import datetime

from .. import run_folder as rf
from ..version import __version__
from .headline import VALIDATION_LABEL
from .metrics import FOLDER_TABLE_HEADER, folder_row, folder_table_cells, table_header
from .report_parts import CSS, _card, _esc, _img, _pct, _table  # noqa: F401 (moved there; imported from here too)


def _summary_cards(meta, ev):
    cards = []
    if ev:
        lo, hi = ev["accuracy_ci95"]
        cards.append(
            _card(
                _pct(ev["accuracy"]),
                f"test accuracy on {ev['n']} images from {ev.get('data_dir')} (95% interval {_pct(lo)}–{_pct(hi)})",
            )
        )
        cards.append(
            _card(f"{ev['calibration']['calibrated']['ece']:.3f}", "expected calibration error on test (0 is perfect)")
        )
        looking = ev.get("looking") or {}
        if looking.get("share") is not None:
            cards.append(
                _card(
                    _pct(looking["share"]),
                    f"of where it looked was on the subject ({looking['n']} test images with a plain background; "
                    f"the subject covers {_pct(looking['subject_area'])} of them)",
                )
            )
        f = ev.get("flags") or {}
        if f.get("share_unfamiliar") is not None:
            cards.append(
                _card(_pct(f["share_unfamiliar"]), "of test images flagged unfamiliar (not like the training images)")
            )
    m = meta.get("metrics", {})
    if "val_accuracy" in m:
        cards.append(
            _card(
                _pct(m["val_accuracy"]),
                f"{VALIDATION_LABEL} ({m.get('n_val', '?')} images, epoch {m.get('epoch', '?')})",
            )
        )
    t = meta.get("timing", {})
    if t:
        cards.append(
            _card(
                f"{t.get('data_seconds', 0) + t.get('train_seconds', 0):.0f} s",
                f"to decode and train ({t.get('data_seconds', 0):.0f} s decoding)",
            )
        )
    return '<div class="cards">' + "".join(cards) + "</div>"


def _data_section(run, meta):
    d = meta.get("data") or {}
    parts = ["<h2>1. The data</h2>"]
    if d:
        parts.append(
            f"<p>Training folder <code>{_esc(d.get('train_dir'))}</code>; validation: {_esc(d.get('validation'))}.</p>"
        )
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
    return (
        "<h2>2. Augmentation</h2><p>Each training step sees randomly changed copies of the images, so the "
        f"model learns the class and not the exact picture. Settings: {_esc(desc)}.</p>"
        + _img(run / rf.AUGMENTATIONS, "original training images and random augmentations of them")
    )


def _model_section(meta, model_summary):
    r = meta.get("recipe") or {}
    keys = [
        "name",
        "model",
        "image_size",
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "schedule",
        "weight_decay",
        "label_smoothing",
        "keep",
    ]
    rows = [(k, r[k]) for k in keys if k in r]
    rows += [
        ("seed", meta.get("seed")),
        ("precision", meta.get("precision")),
        ("test-time augmentation (flip)", meta.get("tta")),
        ("input size", f"{meta.get('image_size')} px"),
        ("classes (in output order)", ", ".join(meta.get("classes", []))),
    ]
    out = ["<h2>3. The model</h2>", f"<p>{_esc(r.get('description', ''))}</p>", _table(["setting", "value"], rows)]
    if model_summary:
        out.append(f"<details><summary>Layers and parameters</summary><pre>{_esc(model_summary)}</pre></details>")
    return "".join(out)


def _refit_sentence(refit):
    if not refit:
        return ""
    return (
        f" Then refitted: a fresh model trained on all {refit['n_train']} images of the folder for {refit['epochs']} "
        f"epochs ({refit['seconds']:.1f} s); that is the saved model, its temperature and unfamiliarity threshold "
        "measured on the held-out images with the model above, which never trained on them."
    )


def _training_section(run, meta, history):
    m, t = meta.get("metrics", {}), meta.get("timing", {})
    out = [
        "<h2>4. Training</h2>",
        f"<p>{m.get('epochs_run', len(history))} epochs on {m.get('n_train', '?')} images; the kept model is "
        f"epoch {m.get('epoch', '?')} (highest validation accuracy"
        f"{'' if (meta.get('recipe') or {}).get('keep') != 'last' else '; this recipe keeps the last epoch'}). "
        f"Decoding took {t.get('data_seconds', 0):.1f} s and training {t.get('train_seconds', 0):.1f} s."
        + (" Training was interrupted." if m.get("interrupted") else "")
        + _refit_sentence(meta.get("refit"))
        + "</p>",
        _img(run / rf.CURVES, "accuracy and loss per epoch for training and validation"),
    ]
    if history:
        rows = [
            (
                h["epoch"],
                f"{h['loss']:.4f}",
                f"{h['accuracy']:.4f}",
                f"{h['val_loss']:.4f}",
                f"{h['val_accuracy']:.4f}",
                f"{h['seconds']:.1f}",
            )
            for h in history
        ]
        out.append(
            "<details><summary>Every epoch</summary>"
            + _table(["epoch", "loss", "accuracy", "val loss", "val accuracy", "seconds"], rows)
            + "</details>"
        )
    return "".join(out)


def _calibration_text(meta, ev):
    cal = meta.get("calibration") or {}
    out = []
    if cal:
        out.append(
            f"<p>The model's probabilities are divided by a temperature fitted on the validation split "
            f"(never on test images): T = {cal['temperature']:.3f} ({_esc(cal.get('rule', ''))}). On "
            f"validation it changed the negative log-likelihood from {cal['val_nll_before']:.4f} to "
            f"{cal['val_nll_after']:.4f}. Predictions below {_pct(cal['uncertain_below'], 0)} are "
            f"marked <b>uncertain</b>.</p>"
        )
    if ev:
        c = ev["calibration"]
        u = ev["uncertain"]
        out.append(
            _table(
                ["on the test images", "raw softmax (T = 1)", f"temperature scaled (T = {c['temperature']:.2f})"],
                [
                    ("expected calibration error", f"{c['uncalibrated']['ece']:.4f}", f"{c['calibrated']['ece']:.4f}"),
                    ("negative log-likelihood", f"{c['uncalibrated']['nll']:.4f}", f"{c['calibrated']['nll']:.4f}"),
                    (
                        "mean confidence",
                        _pct(c["uncalibrated"]["mean_confidence"]),
                        _pct(c["calibrated"]["mean_confidence"]),
                    ),
                    ("accuracy", _pct(ev["accuracy"]), _pct(ev["accuracy"])),
                ],
            )
        )
        out.append(
            f"<p>{u['count']} of {ev['n']} test predictions are marked uncertain; they hold "
            f"{u['errors_flagged']} of the {u['errors']} mistakes. Accuracy of the confident ones: "
            f"{_pct(u['accuracy_confident'])}; of the uncertain ones: {_pct(u['accuracy_uncertain'])}.</p>"
        )
    return "".join(out)


def _flags_text(meta, ev):
    sec = meta.get("unfamiliar")
    out = []
    if sec:
        out.append(
            f"<p>An image is marked <b>unfamiliar</b> when its features (the network's last layer before "
            f"the classifier) lie far from those of every class of training images: Mahalanobis distance "
            f"over {sec['feature_dim']} features (rank {sec['rank']}), threshold {sec['threshold']:.4g}, "
            f"the {_esc(sec['rule'])}. It reliably notices images from another kind of source than the "
            f"training folder; within one kind of image it is a weak sign of a wrong answer, and "
            f"<i>uncertain</i> is the better one.</p>"
        )
    elif (meta.get("preprocessing") or {}).get("hands"):
        out.append(
            "<p>This model classifies the hand MediaPipe Hands finds in a photo: an image is marked "
            "<b>unfamiliar</b> when no hand is found, and then it gets no answer at all. (How far a hand's "
            "landmarks lie from the training hands flagged right and wrong answers alike on real photos, so "
            "it is not used.)</p>"
        )
    else:
        out.append(
            '<p class="missing">This model file has no unfamiliarity score (made by an older '
            "foldercnn); retrain to get one.</p>"
        )
    f = (ev or {}).get("flags")
    if f:
        e = f["errors_flagged"]
        auc = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        out.append(
            _table(
                ["on the test images", "share of images", "mistakes flagged"],
                [
                    ("uncertain", _pct(f["share_uncertain"]), f"{e['uncertain']} of {f['errors']}"),
                    (
                        "unfamiliar",
                        _pct(f["share_unfamiliar"]),
                        "n/a" if e["unfamiliar"] is None else f"{e['unfamiliar']} of {f['errors']}",
                    ),
                    ("either", _pct(f["share_either"]), f"{e['either']} of {f['errors']}"),
                ],
            )
        )
        out.append(
            f"<p>Accuracy on the {f['n_not_flagged']} images neither flag touches: "
            f"{_pct(f['selective_accuracy'])}. Telling wrong answers from right ones (AUROC, 0.5 is "
            f"chance): low confidence {auc(f['auroc_low_confidence'])}, unfamiliarity "
            f"{auc(f['auroc_unfamiliarity'])}.</p>"
        )
    return "".join(out)


def _looking_text(ev):
    """What the mistakes' pictures show, and "does it look at the subject?" when it was measured."""
    text = (
        "<p>Each picture shows where the model looked for the class it chose: a heat map of the places that raised "
        "that class most (Grad-CAM; red: most), or for a hands model the 21 points it read.</p>"
    )
    looking = ev.get("looking") or {}
    if looking.get("share") is None:
        return text
    mistakes = looking.get("share_mistakes")
    return text + (
        f"<p>Does it look at the subject? On the {looking['n']} test images whose background let the subject be "
        f"masked, <b>{_pct(looking['share'])}</b> of its {_esc(looking['measured'])} lay on the subject, which covers "
        f"{_pct(looking['subject_area'])} of the picture (a map spread evenly would get that share)"
        + (f"; on its {looking['n_mistakes']} mistakes {_pct(mistakes)}" if mistakes is not None else "")
        + ".</p>"
    )


def _evaluation_section(run, meta, ev):
    out = ["<h2>5. How good is it? The test images</h2>"]
    if not ev:
        out.append(
            '<p class="missing">No test evaluation yet. Run <code>foldercnn evaluate '
            f"{_esc(run / rf.MODEL)} TEST_FOLDER --out {_esc(run)}</code> with images the model "
            "never saw, and this section fills in.</p>"
        )
        out.append("<h3>Calibration</h3>" + _calibration_text(meta, None))
        out.append("<h3>Warnings: uncertain and unfamiliar</h3>" + _flags_text(meta, None))
        return "".join(out)
    lo, hi = ev["accuracy_ci95"]
    out.append(
        f"<p>On <b>{ev['n']}</b> images from <code>{_esc(ev['data_dir'])}</code>, which played no part in "
        f"training or in choosing the model, it is right <b>{ev['n_correct']}</b> times: accuracy "
        f"<b>{_pct(ev['accuracy'], 2)}</b>, and with 95% confidence the true accuracy on images like these "
        f"lies between {_pct(lo)} and {_pct(hi)} (Wilson interval)."
        + (f" {ev['n_skipped']} file(s) could not be read and were skipped." if ev["n_skipped"] else "")
        + (" Predictions averaged over each image and its mirror image (--tta)." if ev.get("tta") else "")
        + "</p>"
    )
    rows = [
        (c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"])
        for c, m in ev["per_class"].items()
    ]
    mac = ev.get("macro_avg") or {}
    if mac:
        rows.append(("macro average", f"{mac['precision']:.3f}", f"{mac['recall']:.3f}", f"{mac['f1']:.3f}", ev["n"]))
    out.append(_table(["class", "precision", "recall", "F1", "images"], rows))
    out.append(
        '<p class="note">Precision: of the images called this class, the share that were. Recall: of the '
        "images of this class, the share found.</p>"
    )
    out.append("<h3>Confusion matrix</h3>")
    out.append(
        _table(
            ["true \\ predicted"] + ev["classes"],
            [[c] + row for c, row in zip(ev["classes"], ev["confusion"], strict=False)],
        )
    )
    out.append(_img(run / rf.CONFUSION, "confusion matrix"))
    out.append("<h3>The most confident mistakes</h3>" + _looking_text(ev))
    out.append(_img(run / rf.MISTAKES, "wrongly classified test images, with where the model looked"))
    out.append("<h3>Calibration: does 90% sure mean right 9 times in 10?</h3>" + _calibration_text(meta, ev))
    out.append(_img(run / rf.CALIBRATION, "reliability diagram before and after temperature scaling"))
    out.append("<h3>Warnings: uncertain and unfamiliar</h3>" + _flags_text(meta, ev))
    return "".join(out)


def _other_folders_section(ev, rows):
    if not ev or not rows:
        return ""
    all_rows = [folder_row(ev)] + rows
    header = table_header(all_rows)
    table = [folder_table_cells(r, len(header) > len(FOLDER_TABLE_HEADER)) for r in all_rows]
    worst = min(rows, key=lambda r: r["accuracy"])
    gap = ev["accuracy"] - worst["accuracy"]
    note = (
        f'<p class="warn">On <code>{_esc(worst["data_dir"])}</code> it is right {_pct(worst["accuracy"])} of the '
        f"time, {100 * gap:.0f} points below the test folder: photos unlike the training folder (other people, "
        "rooms, cameras) are where this model is weak. Add some of them to the training folder.</p>"
        if gap > 0.05
        else ""
    )
    return (
        "<h2>6. How it does on other photos</h2>"
        "<p>The test folder above usually comes from the same source as the training folder. These folders "
        "were evaluated with it, to show how the model does on photos from elsewhere.</p>"
        + _table(header, table)
        + note
        + '<p class="note">ECE: expected calibration error of the calibrated probabilities (0 is perfect). '
        "Flagged: uncertain or unfamiliar. Accuracy not flagged: on the images neither warning touches.</p>"
    )


def render_report(run, model_path, meta, ev, *, model_summary, history, other_rows, unusable):
    """report.html as a string: the run folder's files already read (ev None: no usable evaluation)."""
    title = f"foldercnn report: {run.resolve().name}"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">Model <code>{_esc(model_path)}</code>: {len(meta["classes"])} classes '
        f"({_esc(', '.join(meta['classes']))}), recipe <b>{_esc((meta.get('recipe') or {}).get('name', '?'))}</b>. "
        f"Made {when} by foldercnn {__version__}.</p>",
        _summary_cards(meta, ev),
        (
            f'<p class="warn">{_esc(rf.EVALUATION)} in this folder is not a usable evaluation (edited or damaged: a '
            "figure missing, of the wrong type or not finite), so it is left out; run <code>foldercnn evaluate "
            "MODEL TEST_FOLDER --out RUN_DIR</code> again.</p>"
            if unusable
            else ""
        ),
        '<p class="note">Validation images come from the training folder, so they are often easier than '
        "new photos (same people, same lighting). The test figures below are the ones to quote.</p>",
        _data_section(run, meta),
        _augmentation_section(run, meta),
        _model_section(meta, model_summary),
        _training_section(run, meta, history),
        _evaluation_section(run, meta, ev),
        _other_folders_section(ev, other_rows),
        "<h2>Use it</h2><pre>"
        + _esc(f"foldercnn predict {model_path} photo.jpg\nfoldercnn serve {model_path}\nfoldercnn report {run}")
        + "</pre>",
    ]
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
