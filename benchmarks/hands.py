"""Finding the hand: what each stage of the cascade adds, how right the landmark model is on what it finds, what
it costs.

    python benchmarks/hands.py --model runs/hands/model.safetensors \
        --sets ../shared/data/rps/test,../shared/data/rps-photos/green-screen,../shared/data/rps-photos/sxsw \
        [--per-set 300] [--complexity 0]

For a sample of each labelled folder (seeded, stratified), one process, no cache: every image is decoded as the
model decodes it, then the cascade runs stage by stage. Per stage: the share of images whose hand it found
(after the earlier stages failed), the model's accuracy on those, and the milliseconds an image costs when it
stops at that stage. Then the median milliseconds per image (hand finding + features + head) and the share of
images that no stage found.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import foldercnn
from foldercnn.data.folders import scan_folder, stratified_split
from foldercnn.data.hands import CASCADE, HandFinder
from foldercnn.data.images import decode
from foldercnn.models.landmarks import hand_features


def sample(folder, classes, per_set, seed=0):
    scanned = scan_folder(folder, classes=classes, min_classes=1)
    labels = torch.tensor(scanned.labels)
    if per_set < len(labels):
        _, keep = stratified_split(labels, per_set / len(labels), seed)
        keep = sorted(keep.tolist())
    else:
        keep = range(len(labels))
    return [scanned.files[i] for i in keep], [int(labels[i]) for i in keep]


def measure(clf, finder, files, labels):
    rows = []
    for path, label in zip(files, labels):
        rgb = decode(path, clf.image_size)
        t = time.perf_counter()
        hand = finder.find(rgb)
        pred = None
        if hand is not None:
            x = torch.from_numpy(hand_features(hand.points[None], hand.world[None]))
            with torch.no_grad():
                pred = int(clf.model(x).argmax(1))
        rows.append((hand.stage if hand else None, pred == label, 1000 * (time.perf_counter() - t)))
    return rows


def report(name, rows):
    n = len(rows)
    print(f"\n{name}: {n} images; median {np.median([r[2] for r in rows]):.0f} ms per image")
    print(f"  {'stage':<16}{'found':>8}{'accuracy':>10}{'ms/image':>10}")
    for stage in [s.name for s in CASCADE] + [None]:
        mine = [r for r in rows if r[0] == stage]
        if not mine:
            continue
        acc = f"{np.mean([r[1] for r in mine]):.1%}" if stage else "-"
        print(f"  {stage or 'no hand':<16}{len(mine) / n:>8.1%}{acc:>10}{np.median([r[2] for r in mine]):>10.0f}")
    found = [r for r in rows if r[0] is not None]
    print(
        f"  all stages: found {len(found) / n:.1%}, accuracy where found "
        f"{np.mean([r[1] for r in found]):.1%}, overall {sum(r[1] for r in found) / n:.1%}"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--sets", required=True, help="comma-separated labelled folders")
    ap.add_argument("--per-set", type=int, default=300)
    ap.add_argument("--complexity", type=int, default=0, choices=[0, 1], help="MediaPipe model_complexity")
    args = ap.parse_args()
    foldercnn.runtime.setup()
    clf = foldercnn.load(args.model)
    finder = HandFinder(model_complexity=args.complexity)
    print(
        f"model {args.model}; MediaPipe Hands model_complexity {args.complexity}; "
        f"{torch.get_num_threads()} torch threads"
    )
    for folder in args.sets.split(","):
        files, labels = sample(Path(folder), clf.classes, args.per_set)
        report(folder, measure(clf, finder, files, labels))


if __name__ == "__main__":
    main()
