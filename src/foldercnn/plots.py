"""PNG figures for every stage (samples, augmentations, curves, confusion, mistakes, calibration), written
atomically.

Figures are plain `matplotlib.figure.Figure` objects rendered by the Agg canvas: pyplot is never imported, so
drawing a figure neither needs a display nor switches the plotting backend of a caller's notebook.
"""

import torch
from matplotlib.figure import Figure

from .files import atomic_path


def _figure(rows=None, cols=None, figsize=None, **subplots):
    fig = Figure(figsize=figsize)
    if rows is None:
        return fig, fig.add_subplot()
    return fig, fig.subplots(rows, cols, **subplots)


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def sample_grid(images, labels, classes, path, per_class=6, title="Samples"):
    """A row of a few images per class. images: (N, S, S, 3) uint8 tensor; labels: (N,)."""
    rows = len(classes)
    fig, axes = _figure(rows, per_class, figsize=(1.6 * per_class, 1.7 * rows), squeeze=False)
    for r, name in enumerate(classes):
        members = (labels == r).nonzero().flatten()
        # evenly spaced through the class: neighbouring files are often near-duplicates
        idx = (
            members[torch.linspace(0, len(members) - 1, min(per_class, len(members))).long()].tolist()
            if len(members)
            else []
        )
        for c in range(per_class):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(idx):
                ax.imshow(images[idx[c]].numpy())
            if c == 0:
                ax.set_ylabel(name, fontsize=11, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=12)
    return _save(fig, path)


def augmentation_preview(images, augment, description, path, variants=5, seed=0):
    """Each row: an original training image, then `variants` outputs of augment(x, generator) for it."""
    g = torch.Generator().manual_seed(seed)
    x = images.permute(0, 3, 1, 2).float() / 255
    n = len(x)
    fig, axes = _figure(n, variants + 1, figsize=(1.6 * (variants + 1), 1.7 * n), squeeze=False)
    views = [x] + [augment(x, g) for _ in range(variants)]
    for r in range(n):
        for c, v in enumerate(views):
            ax = axes[r][c]
            ax.imshow(v[r].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
    fig.suptitle(f"Training augmentation ({description or 'none'})", fontsize=10)
    return _save(fig, path)


def training_curves(history, path, title="Training curves"):
    """Accuracy and loss per epoch, training vs validation."""
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = _figure(1, 2, figsize=(11, 4))
    for ax, key, label in ((a1, "accuracy", "Accuracy"), (a2, "loss", "Loss")):
        ax.plot(epochs, [h[key] for h in history], "o-", label=f"training {label.lower()}")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label=f"validation {label.lower()}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    a1.legend(loc="lower right")
    a2.legend(loc="upper right")
    a1.set_ylim(0, 1.02)
    fig.suptitle(title)
    return _save(fig, path)


def confusion_matrix_plot(confusion, classes, path, title="Confusion matrix"):
    """Counts per (true, predicted) pair; cell colour is the share of the true class (row)."""
    import numpy as np

    cm = np.asarray(confusion, float)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    side = min(12, 2.2 + 0.9 * k)
    fig, ax = _figure(figsize=(side + 1.2, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=11 if k <= 10 else 7,
                    color="white" if share[i, j] > 0.6 else "black",
                )
    ax.set_xticks(range(k), classes, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title(title)
    return _save(fig, path)


def mistakes_gallery(images, mistakes, path, n_total, columns=4):
    """The most confident wrong predictions: each image with its true class, prediction and probability."""
    if not mistakes:
        fig, ax = _figure(figsize=(6, 1.2))
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            f"No mistakes: all {n_total} images were classified correctly.",
            ha="center",
            va="center",
            fontsize=12,
        )
        return _save(fig, path)
    rows = (len(mistakes) + columns - 1) // columns
    fig, axes = _figure(rows, columns, figsize=(2.8 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, m in zip(axes.flat, images, mistakes):
        ax.imshow(image)
        name = m["path"].replace("\\", "/").split("/")[-1]
        ax.set_title(
            f"true: {m['true']}\npredicted: {m['predicted']} ({m['probability']:.0%})\n{name[:28]}",
            fontsize=9,
            color="#a00000",
        )
    fig.suptitle(f"The {len(mistakes)} most confident mistakes (of {n_total} images)", fontsize=12)
    return _save(fig, path)


def reliability_diagram(calibration, path, title="Calibration"):
    """Accuracy vs confidence per bin, raw softmax and temperature-scaled, with the share of images per bin."""
    fig, axes = _figure(2, 2, figsize=(10, 6.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    runs = (
        ("uncalibrated", "raw softmax (T = 1)"),
        ("calibrated", f"temperature scaled (T = {calibration['temperature']:.2f})"),
    )
    for col, (key, label) in enumerate(runs):
        part = calibration[key]
        bins = part["reliability"]
        top, bottom = axes[0][col], axes[1][col]
        width = bins[0]["hi"] - bins[0]["lo"]
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        used = [b for b in bins if b["count"]]
        top.bar(
            [(b["lo"] + b["hi"]) / 2 for b in used],
            [b["accuracy"] for b in used],
            width=width * 0.9,
            color="#4c72b0",
            label="accuracy of the images in the bin",
        )
        top.plot(
            [(b["lo"] + b["hi"]) / 2 for b in used],
            [b["confidence"] for b in used],
            "D",
            color="#dd5522",
            label="their mean confidence",
        )
        for b in used:  # how many images each bar stands for: a bar of 2 images says little
            top.text(
                (b["lo"] + b["hi"]) / 2,
                0.02,
                f"n={b['count']}",
                ha="center",
                fontsize=7,
                rotation=90,
                va="bottom",
                color="white" if b["accuracy"] > 0.15 else "black",
            )
        top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1.05)
        top.set_ylabel("accuracy")
        top.set_title(f"{label}\nexpected calibration error {part['ece']:.3f}", fontsize=10)
        top.legend(loc="upper left", fontsize=8)
        n = max(1, sum(b["count"] for b in bins))
        bottom.bar(centres, [b["count"] / n for b in bins], width=width * 0.9, color="#8c8c8c")
        bottom.set_ylim(0, 1)
        bottom.set_xlabel("confidence (top probability)")
        bottom.set_ylabel("share of images")
    fig.suptitle(
        f"{title}\nA bar below its diamond: the model was more sure than right (over-confident); "
        "above: less sure than right.",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)
