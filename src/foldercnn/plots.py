"""PNG figures: sample grid, augmentation preview, training curves. Written atomically."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .augment import augment_batch  # noqa: E402
from .files import atomic_path  # noqa: E402


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def sample_grid(images, labels, classes, path, per_class=6, title="Samples"):
    """A row of a few images per class. images: (N, S, S, 3) uint8 tensor; labels: (N,)."""
    rows = len(classes)
    fig, axes = plt.subplots(rows, per_class, figsize=(1.6 * per_class, 1.7 * rows), squeeze=False)
    for r, name in enumerate(classes):
        members = (labels == r).nonzero().flatten()
        # evenly spaced through the class: neighbouring files are often near-duplicates
        idx = members[torch.linspace(0, len(members) - 1, min(per_class, len(members))).long()].tolist() \
            if len(members) else []
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


def augmentation_preview(images, cfg, path, variants=5, seed=0):
    """Each row: an original training image, then `variants` random augmentations of it."""
    g = torch.Generator().manual_seed(seed)
    x = images.permute(0, 3, 1, 2).float() / 255
    n = len(x)
    fig, axes = plt.subplots(n, variants + 1, figsize=(1.6 * (variants + 1), 1.7 * n), squeeze=False)
    views = [x] + [augment_batch(x, cfg, g) for _ in range(variants)]
    for r in range(n):
        for c, v in enumerate(views):
            ax = axes[r][c]
            ax.imshow(v[r].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"augmented {c}", fontsize=9)
    desc = ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items() if v)
    fig.suptitle(f"Training augmentation ({desc or 'none'})", fontsize=10)
    return _save(fig, path)


def training_curves(history, path, title="Training curves"):
    """Accuracy and loss per epoch, training vs validation."""
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
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
