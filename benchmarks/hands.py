"""Finding the hand: what each stage of the cascade adds, how right the landmark model is on what it finds, what
it costs; and how far foldercnn's finder is from MediaPipe itself.

    python benchmarks/hands.py --model runs/hands/model.safetensors \
        --sets ../shared/data/rps/test,../shared/data/rps-photos/green-screen,../shared/data/rps-photos/sxsw \
        [--per-set 300] [--models lite|full]
    pip install mediapipe==0.10.14   # Python <= 3.12; only for this comparison
    python benchmarks/hands.py --against-mediapipe \
        --sets ../shared/data/rps-photos/green-screen,../shared/data/rps-photos/sxsw

--against-mediapipe runs MediaPipe Hands (`solutions.hands`, static images, one hand, the same detection
confidence and lite models) and foldercnn's first cascade stage (the same two models as ONNX, the same decoding)
on each photo, and prints how often both, one or neither found a hand, how often they agree on handedness, and
the distance between their landmarks where both found one: the largest of the 21 points' x, y differences per
photo as a fraction of the image's side (median, 95th percentile, max), and the world points' in millimetres.

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
from foldercnn.data.images import Letterbox, decode
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


MODELS = {"lite": ("palm_detection_lite", "hand_landmark_lite"), "full": ("palm_detection_full", "hand_landmark_full")}


def against_mediapipe(files, models):
    """Per photo: (MediaPipe found, ours found, same handedness, max x/y difference, max world difference)."""
    import warnings

    from mediapipe.python.solutions import hands as mp_hands

    warnings.simplefilter("ignore")
    theirs = mp_hands.Hands(
        static_image_mode=True,
        max_num_hands=1,
        min_detection_confidence=CASCADE[0].confidence,
        model_complexity=0 if models == "lite" else 1,
    )
    ours = HandFinder(cascade=CASCADE[:1], models=MODELS[models])
    rows = []
    for path in files:
        rgb = decode(path, Letterbox(256))
        r, hand = theirs.process(rgb), ours.find(rgb)
        found = bool(r.multi_hand_landmarks)
        if not (found and hand is not None):
            rows.append((found, hand is not None, None, None, None))
            continue
        p = np.array([[q.x, q.y] for q in r.multi_hand_landmarks[0].landmark])
        w = np.array([[q.x, q.y, q.z] for q in r.multi_hand_world_landmarks[0].landmark])
        same = (r.multi_handedness[0].classification[0].label == "Right") == hand.right
        rows.append(
            (True, True, same, float(np.abs(p - hand.points[:, :2]).max()), float(np.abs(w - hand.world).max()))
        )
    return rows


def report_against(name, rows):
    both = [r for r in rows if r[0] and r[1]]
    d, dw = np.array([r[3] for r in both]), 1000 * np.array([r[4] for r in both])
    print(
        f"{name}: {len(rows)} photos; both found {len(both)}, only MediaPipe {sum(r[0] and not r[1] for r in rows)}, "
        f"only foldercnn {sum(r[1] and not r[0] for r in rows)}; "
        f"same handedness {sum(r[2] for r in both)} of {len(both)}"
    )
    if len(both):
        print(
            f"  landmarks x/y: median {np.median(d):.4f}, p95 {np.percentile(d, 95):.4f}, "
            f"max {d.max():.4f} of the side;"
            f" world: median {np.median(dw):.1f} mm, p95 {np.percentile(dw, 95):.1f} mm, max {dw.max():.1f} mm"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a hands model (for the per-stage accuracy)")
    ap.add_argument("--sets", required=True, help="comma-separated labelled folders")
    ap.add_argument("--per-set", type=int, default=300)
    ap.add_argument("--models", choices=sorted(MODELS), default="lite", help="MediaPipe's lite or full models")
    ap.add_argument("--against-mediapipe", action="store_true")
    args = ap.parse_args()
    foldercnn.runtime.setup()
    if args.against_mediapipe:
        print(
            f"foldercnn's finder (first stage) vs MediaPipe Hands, {args.models} models, images letterboxed to 256 px"
        )
        for folder in args.sets.split(","):
            files, _ = sample(Path(folder), ["paper", "rock", "scissors"], args.per_set)
            report_against(folder, against_mediapipe(files, args.models))
        return
    if args.model is None:
        ap.error("--model is needed unless --against-mediapipe")
    clf = foldercnn.load(args.model)
    finder = HandFinder(models=MODELS[args.models])
    print(
        f"model {args.model}; MediaPipe's {args.models} models on onnxruntime; {torch.get_num_threads()} torch threads"
    )
    for folder in args.sets.split(","):
        files, labels = sample(Path(folder), clf.classes, args.per_set)
        report(folder, measure(clf, finder, files, labels))


if __name__ == "__main__":
    main()
