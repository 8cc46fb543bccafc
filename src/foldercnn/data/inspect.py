"""`foldercnn inspect`: what is in a labelled folder, what is unusable and why, and a sample grid."""
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .folders import load_folder, scan_folder
from .. import run_folder as rf
from ..plots import sample_grid

THUMB = 96


@dataclass
class FolderReport:
    root: Path
    classes: list
    counts: dict  # class -> usable images
    sizes: Counter  # (w, h) -> count
    modes: Counter  # Pillow mode -> count
    formats: Counter
    skipped: list
    samples_path: Path = None


def _header(path):
    try:
        with Image.open(path) as im:
            return im.size, im.mode, im.format
    except Exception:
        return None


def inspect_folder(data_dir, out_dir=None, per_class=6):
    """Scan DATA_DIR, decode every image once (finding the broken ones), summarise, draw samples.png."""
    folder = scan_folder(data_dir)
    data = load_folder(folder, THUMB, require_every_class=False)
    bad = {str(p) for p, _ in data.skipped}
    sizes, modes, formats = Counter(), Counter(), Counter()
    for p in folder.files:
        if str(p) in bad:
            continue
        h = _header(p)
        if h:
            sizes[h[0]] += 1
            modes[h[1]] += 1
            formats[h[2]] += 1
    counts = {c: int((data.labels == i).sum()) for i, c in enumerate(folder.classes)}
    report = FolderReport(Path(data_dir), folder.classes, counts, sizes, modes, formats, data.skipped)
    if out_dir is not None:
        report.samples_path = sample_grid(data.images, data.labels, folder.classes,
                                          Path(out_dir) / rf.SAMPLES, per_class=per_class,
                                          title=f"{Path(data_dir).name}: {per_class} images per class")
    return report


def format_report(r):
    total = sum(r.counts.values())
    w = max(len(c) for c in r.classes) + 2
    lines = [f"{r.root}: {len(r.classes)} classes, {total} usable images"]
    lines += [f"  {c:<{w}}{n:>7}" for c, n in r.counts.items()]
    top = lambda c: ", ".join(f"{k} x{v}" for k, v in c.most_common(5)) + (" ..." if len(c) > 5 else "")
    lines.append("sizes:   " + top(Counter({f"{w_}x{h_}": n for (w_, h_), n in r.sizes.items()})))
    lines.append("modes:   " + top(r.modes))
    lines.append("formats: " + top(r.formats))
    counts = list(r.counts.values())
    if counts and min(counts) and max(counts) / min(counts) > 1.5:
        lines.append(f"note: classes are imbalanced ({min(counts)} to {max(counts)} images)")
    if r.skipped:
        lines.append(f"cannot use {len(r.skipped)} file(s):")
        lines += [f"  {p}: {why}" for p, why in r.skipped]
    else:
        lines.append("every file is usable")
    if r.samples_path:
        lines.append(f"sample grid: {r.samples_path}")
    return "\n".join(lines)
