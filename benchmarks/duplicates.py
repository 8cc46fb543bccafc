"""Near-duplicate detection: speed, planted copies found, false pairs, and the groups in real folders.

    python benchmarks/duplicates.py --data ../shared/data/rps --photos ../shared/data/rps-photos [--planted 400]

Planted copies: `--planted` training images, each copied as a file (into a temporary folder) after one of four
edits: resized to half size, re-compressed as JPEG quality 40, cropped by up to 5% on each side, or all three.
The copies are decoded like any folder and searched `--against` the training folder, as `foldercnn inspect
TRAIN --against COPIES` does. False pairs: pairs of images of *different classes* (two different gestures are
never duplicates). Speed: descriptors + pairing + file hashing, after decoding, per image.
For each threshold it prints recall per edit and false pairs, so the default's trade-off is visible.
"""

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from foldercnn.data import duplicates as dup
from foldercnn.data.folders import load_folder, scan_folder

SIZE = 96  # what `foldercnn inspect` decodes at
EDITS = ("resize", "jpeg", "crop", "all")
THRESHOLDS = (0.95, 0.96, 0.97, 0.98)


def planted_copies(paths, n, out_dir, rng):
    """Write edited copies of n random images; returns [(source index, edit, copy path)]."""
    rows = []
    for k, i in enumerate(rng.sample(range(len(paths)), n)):
        im = Image.open(paths[i]).convert("RGB")
        edit = EDITS[k % len(EDITS)]
        if edit in ("resize", "all"):
            im = im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
        if edit in ("crop", "all"):
            d = int(0.05 * im.width)
            im = im.crop(
                (rng.randint(0, d), rng.randint(0, d), im.width - rng.randint(0, d), im.height - rng.randint(0, d))
            )
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=40 if edit in ("jpeg", "all") else 95)
        target = out_dir / "x" / f"copy{k:04d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buf.getvalue())
        rows.append((i, edit, target))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--planted", type=int, default=400)
    args = ap.parse_args()

    train = load_folder(scan_folder(args.data / "train"), SIZE)
    t = time.perf_counter()
    dup.near_duplicate_groups(train.images, train.paths)
    seconds = time.perf_counter() - t
    print(
        f"speed: {len(train)} images of {args.data / 'train'} in {seconds:.2f} s after decoding "
        f"= {len(train) / seconds:.0f} images/s (descriptors, pairing, sha256 of every file)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        rows = planted_copies(train.paths, args.planted, Path(tmp), random.Random(0))
        copies = load_folder(scan_folder(tmp, min_classes=1), SIZE)
        by_path = {p: r for p, r in zip(copies.paths, copies.images)}
        copy_images = torch.stack([by_path[r[2]] for r in rows])
    # each copy against its source, and every candidate pair of training images, scored as inspect scores them
    n = len(rows)
    train_desc = dup.descriptors(train.images)
    own = dup.refine_pairs(
        [(k, r[0], 0.0) for k, r in enumerate(rows)],
        copy_images,
        dup.descriptors(copy_images),
        train.images,
        train_desc,
    )
    # every training pair at the whole-image candidate level, re-scored crop-aware: which would be false pairs
    candidates = dup.similar_pairs(train_desc, threshold=dup.CANDIDATE)
    pairs = list(zip(candidates, dup.refine_pairs(candidates, train.images, train_desc).tolist()))
    different_class = [(train.labels[i] != train.labels[j]).item() for (i, j, _), _ in pairs]
    print(f"\nplanted: {n} edited copies of {args.data / 'train'} images ({n // 4} per edit)")
    print(f"{'threshold':>9} " + " ".join(f"{e:>7}" for e in EDITS) + f" {'all':>7}  false pairs (different classes)")
    for threshold in THRESHOLDS:
        found = own >= threshold
        per_edit = [found[[k for k, r in enumerate(rows) if r[1] == e]].float().mean().item() for e in EDITS]
        false_pairs = sum(d and s >= threshold for d, (_, s) in zip(different_class, pairs))
        mark = "  <- default" if threshold == dup.THRESHOLD else ""
        print(
            f"{threshold:>9.3f} "
            + " ".join(f"{v:>7.1%}" for v in per_edit)
            + f" {found.float().mean().item():>7.1%}  {false_pairs}{mark}"
        )

    folders = [args.data / "train", args.data / "test"]
    if args.photos:
        folders += sorted(p for p in args.photos.iterdir() if p.is_dir())
    print(f"\ngroups of near-duplicates at the default threshold {dup.THRESHOLD}:")
    print(
        f"{'folder':<40} {'images':>7} {'groups':>7} {'in groups':>10} {'largest':>8} {'mixed-class':>12} "
        f"{'images/s':>9}"
    )
    for folder in folders:
        data = load_folder(scan_folder(folder), SIZE)
        t = time.perf_counter()
        groups = dup.groups_of(dup.near_duplicate_groups(data.images, data.paths))
        rate = len(data) / (time.perf_counter() - t)
        mixed = sum(len(set(data.labels[g].tolist())) > 1 for g in groups)
        print(
            f"{str(folder):<40} {len(data):>7} {len(groups):>7} {sum(map(len, groups)):>10} "
            f"{len(groups[0]) if groups else 0:>8} {mixed:>12} {rate:>9.0f}"
        )


if __name__ == "__main__":
    main()
