"""An Evaluation as text: the summary printed by `evaluate`, the flag lines, and the one-row-per-folder table."""


def format_evaluation(ev):
    w = max(len(c) for c in ev.classes + ["class"]) + 2
    lo, hi = ev.accuracy_ci
    lines = [
        f"accuracy {ev.accuracy:.4f} on {ev.n} images ({ev.accuracy * ev.n:.0f} correct), "
        f"95% interval {lo:.4f}-{hi:.4f}; {len(ev.skipped)} skipped",
        "",
        f"{'class':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for c, m in ev.per_class.items():
        lines.append(f"{c:<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10}")
    if ev.macro:
        m = ev.macro
        lines.append(f"{'macro avg':<{w}}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{ev.n:>10}")
    lines += [
        "",
        "confusion matrix (rows: true class, columns: predicted class)",
        " " * w + "".join(f"{c[:9]:>10}" for c in ev.classes),
    ]
    for c, row in zip(ev.classes, ev.confusion):
        lines.append(f"{c:<{w}}" + "".join(f"{v:>10}" for v in row))
    cal = ev.calibration
    if cal:
        lines += [
            "",
            f"calibration: temperature {cal['temperature']:.3f}; expected calibration error "
            f"{cal['uncalibrated']['ece']:.4f} raw -> {cal['calibrated']['ece']:.4f} calibrated "
            f"(NLL {cal['uncalibrated']['nll']:.4f} -> {cal['calibrated']['nll']:.4f})",
        ]
    u = ev.uncertain
    if u:
        lines.append(
            f"uncertain (top probability < {u['threshold']:.2f}): {u['count']} of {ev.n}, "
            f"holding {u['errors_flagged']} of the {u['errors']} mistakes"
        )
    lines += format_flags(ev.flags)
    lines += format_looking(ev.looking)
    wrong = ev.mistakes(5)
    if wrong:
        lines.append("most confident mistakes:")
        lines += [f"  {r['path']}: {r['true']} called {r['predicted']} ({r['probability']:.1%})" for r in wrong]
    for p, r in ev.skipped[:10]:
        lines.append(f"skipped {p}: {r}")
    if len(ev.skipped) > 10:
        lines.append(f"... and {len(ev.skipped) - 10} more skipped")
    return "\n".join(lines)


def format_looking(looking):
    if not looking or looking.get("share") is None:
        return []
    mistakes = looking.get("share_mistakes")
    return [
        f"where it looked: {looking['share']:.1%} of its {looking['measured']} on the subject, on {looking['n']} "
        f"images with a plain background (the subject covers {looking['subject_area']:.1%} of them)"
        + (f"; on the {looking['n_mistakes']} mistakes {mistakes:.1%}" if mistakes is not None else "")
    ]


def _fmt(x, pct=True):
    return "n/a" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3f}")


def format_flags(f):
    """The warnings' text lines for `evaluate` (empty without flags)."""
    if not f:
        return []
    e = f["errors_flagged"]
    if f["share_unfamiliar"] is None:
        unf = "unfamiliar: not available (the model file has no unfamiliarity score; retrain to get one)"
    else:
        unf = (
            f"unfamiliar (does not look like the training images): {_fmt(f['share_unfamiliar'])} of images, "
            f"holding {e['unfamiliar']} of the {f['errors']} mistakes"
        )
    return [
        unf,
        f"flagged uncertain or unfamiliar: {_fmt(f['share_either'])} of images, holding {e['either']} of the "
        f"{f['errors']} mistakes; accuracy on the {f['n_not_flagged']} images not flagged: "
        f"{_fmt(f['selective_accuracy'])}",
        f"telling wrong from right (AUROC, 0.5 = chance): low confidence {_fmt(f['auroc_low_confidence'], False)}, "
        f"unfamiliarity {_fmt(f['auroc_unfamiliarity'], False)}",
    ]


def folder_row(ev):
    """One line of figures for a folder, from Evaluation.to_dict() (or evaluation.json): what `evaluate MODEL
    DIR1 DIR2 ...` prints and the report's "other photos" table shows."""
    f = ev.get("flags") or {}
    return {
        "data_dir": ev.get("data_dir"),
        "n": ev["n"],
        "accuracy": ev["accuracy"],
        "accuracy_ci95": ev["accuracy_ci95"],
        "ece": ((ev.get("calibration") or {}).get("calibrated") or {}).get("ece"),
        "share_flagged": f.get("share_either"),
        "share_unfamiliar": f.get("share_unfamiliar"),
        "errors": f.get("errors"),
        "errors_flagged": (f.get("errors_flagged") or {}).get("either"),
        "selective_accuracy": f.get("selective_accuracy"),
        "n_not_flagged": f.get("n_not_flagged"),
        "auroc_low_confidence": f.get("auroc_low_confidence"),
        "auroc_unfamiliarity": f.get("auroc_unfamiliarity"),
        "hand_coverage": (ev.get("hands") or {}).get("coverage"),
    }


FOLDER_TABLE_HEADER = [
    "folder",
    "images",
    "accuracy",
    "95% interval",
    "ECE",
    "flagged",
    "mistakes flagged",
    "accuracy not flagged",
]


def table_header(rows):
    """The folder table's columns; "hand found" only for landmark models' rows."""
    return FOLDER_TABLE_HEADER + (["hand found"] if any(r.get("hand_coverage") is not None for r in rows) else [])


def folder_table_cells(row, hands=False):
    lo, hi = row["accuracy_ci95"]
    caught = "n/a" if row["errors_flagged"] is None else f"{row['errors_flagged']} of {row['errors']}"
    return [
        row["data_dir"],
        str(row["n"]),
        _fmt(row["accuracy"]),
        f"{_fmt(lo)}-{_fmt(hi)}",
        _fmt(row["ece"], False),
        _fmt(row["share_flagged"]),
        caught,
        _fmt(row["selective_accuracy"]),
    ] + ([_fmt(row.get("hand_coverage"))] if hands else [])


def format_folder_table(rows):
    """Plain-text table, one row per evaluated folder."""
    header = table_header(rows)
    cells = [header] + [folder_table_cells(r, len(header) > len(FOLDER_TABLE_HEADER)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in cells
    )
