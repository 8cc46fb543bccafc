"""`foldercnn inspect`: what is in a labelled folder, what is unusable and why, and a sample grid."""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .. import run_folder as rf
from ..files import check_out_dir
from ..plots import sample_grid
from . import duplicates as dup
from .folders import load_folder, scan_folder

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
    duplicate_groups: list | None = None  # lists of paths of near-identical images, largest first
    leaks: list | None = None  # (image of the --against folder, its near-duplicate here, score)
    against: Path | None = None
    samples_path: Path | None = None


def _header(path):
    try:
        with Image.open(path) as im:
            return im.size, im.mode, im.format
    except Exception:
        return None


def inspect_folder(data_dir, out_dir=None, per_class=6, against=None):
    """Scan DATA_DIR, decode every image once (finding the broken ones), summarise, find near-duplicates, draw
    samples.png. With `against` (a test folder): list its images that nearly duplicate an image of DATA_DIR."""
    if out_dir is not None:
        check_out_dir(out_dir, [data_dir, against])
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
    groups = dup.groups_of(dup.near_duplicate_groups(data.images, data.paths))
    report = FolderReport(
        Path(data_dir),
        folder.classes,
        counts,
        sizes,
        modes,
        formats,
        data.skipped,
        [[data.paths[i] for i in g] for g in groups],
    )
    if against is not None:
        other = load_folder(scan_folder(against, min_classes=1), THUMB, require_every_class=False)
        report.against = Path(against)
        report.leaks = [
            (other.paths[i], data.paths[j], s) for i, j, s in dup.matches_against(other.images, data.images)
        ]
    if out_dir is not None:
        report.samples_path = sample_grid(
            data.images,
            data.labels,
            folder.classes,
            Path(out_dir) / rf.SAMPLES,
            per_class=per_class,
            title=f"{Path(data_dir).name}: {per_class} images per class",
        )
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
    lines += format_duplicates(r)
    if r.samples_path:
        lines.append(f"sample grid: {r.samples_path}")
    return "\n".join(lines)


def format_duplicates(r, listed=5):
    groups = r.duplicate_groups or []
    lines = [
        f"near-duplicates: {len(groups)} groups, {sum(map(len, groups))} images "
        f"(resized, re-compressed, slightly cropped copies, burst frames, neighbouring renders)"
    ]
    for g in groups[:listed]:
        lines.append(f"  {len(g)} images: {g[0].name}, {g[1].name}" + (", ..." if len(g) > 2 else ""))
    if len(groups) > listed:
        lines.append(f"  ... and {len(groups) - listed} more groups")
    if groups:
        lines.append("  `foldercnn train` keeps each group on one side of its validation split")
    if r.against is not None:
        lines.append(
            f"leaks: {len(r.leaks)} image(s) of {r.against} nearly duplicate training images"
            + (" (test figures on them flatter the model)" if r.leaks else "")
        )
        lines += [f"  {a} ~ {b} ({s:.3f})" for a, b, s in r.leaks[:20]]
        if len(r.leaks) > 20:
            lines.append(f"  ... and {len(r.leaks) - 20} more")
    return lines
