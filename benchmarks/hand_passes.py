"""Which order of the hand finder's passes finds and reads the most hands: every pass run on every image, then
the rules that combine them compared on the same results.

    python benchmarks/hand_passes.py --data ../shared/data/rps --photos ../shared/data/rps-photos \
        [--per-set 0] [--models lite|full] [--workers 2] [--cache /tmp/hand-passes]

Each image is decoded as a `hands` model decodes it (letterboxed into 256 x 256). The passes: each palm-detector
stage of data/hands.py's cascade on its own, and the landmark model alone on the whole image at its best quarter
turn. A plain head (logistic regression on `hand_features`, with the recipe's augmented views) is fitted on the
hands of `rps/train` found by each rule, then every rule's coverage (hand found), accuracy where found and
overall accuracy is printed per set, with the median milliseconds the rule costs an image. The passes' results
are kept in --cache (by set, model and sample), so a second run only re-fits heads.
"""

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from foldercnn.data.folders import scan_folder
from foldercnn.data.hands import CASCADE, HandFinder, transformed, turned_back
from foldercnn.data.images import Letterbox, decode
from foldercnn.models.landmarks import hand_features

PALM_STAGES = [s for s in CASCADE if not s.landmarks_only]
LO_STAGE, LAST_STAGE = [s for s in CASCADE if s.landmarks_only]  # the lite model alone; the full one, a margin
PASSES = [s.name for s in PALM_STAGES] + [LO_STAGE.name]
MODELS = {"lite": ("palm_detection_lite", "hand_landmark_lite"), "full": ("palm_detection_full", "hand_landmark_full")}
_FINDER = None


def _init(models):
    global _FINDER
    _FINDER = HandFinder(models=MODELS[models])


def run_passes(path):
    """(found (P,), points (P, 21, 3), world (P, 21, 3), presence (P,), fill (P,), ms (P,)) for every pass;
    `fill` is the hand box's side over the image's longer side."""
    rgb = decode(path, Letterbox(256))
    n = len(PASSES)
    out = (np.zeros(n, bool), np.zeros((n, 21, 3), np.float32), np.zeros((n, 21, 3), np.float32))
    presence, fill, ms = np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, np.float32)
    for k, stage in enumerate(PALM_STAGES):
        t = time.perf_counter()
        image, back = transformed(rgb, stage)
        palms = _FINDER.models.palms(image, stage.confidence)
        if palms:
            marks = _FINDER.models.landmarks(image, palms[0][1])
            presence[k], fill[k] = marks.presence, palms[0][1].width / max(image.shape[:2])
            if marks.presence >= 0.5:
                out[0][k] = True
                out[1][k] = marks.points
                out[1][k][:, :2] = back(marks.points[:, :2])
                out[2][k] = turned_back(marks.world, stage.turns)
        ms[k] = 1000 * (time.perf_counter() - t)
    t = time.perf_counter()
    hand = _FINDER.landmarks_only(rgb, LO_STAGE)
    ms[-1] = 1000 * (time.perf_counter() - t)
    if hand is not None:
        out[0][-1], out[1][-1], out[2][-1], presence[-1] = True, hand.points, hand.world, hand.score
    return (*out, presence, fill, ms)


def collect(folder, classes, per_set, models, workers, cache):
    scanned = scan_folder(folder, classes=classes, min_classes=1)
    files, labels = list(scanned.files), np.asarray(scanned.labels)
    if per_set and per_set < len(files):
        keep = np.sort(np.random.default_rng(0).permutation(len(files))[:per_set])
        files, labels = [files[i] for i in keep], labels[keep]
    key = cache / f"{folder.name}-{folder.parent.name}-{models}-{len(files)}.npz"
    if key.exists():
        return add_last_stage(dict(np.load(key)), files, models, workers, key), labels
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(models,)) as pool:
        rows = list(pool.map(run_passes, files, chunksize=8))
    names = ("found", "points", "world", "presence", "fill", "ms")
    result = {name: np.stack([r[i] for r in rows]) for i, name in enumerate(names)}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(key, **result)
    return add_last_stage(result, files, models, workers, key), labels


def last_stage(path):
    """The cascade's last stage alone: (found, points, world, ms)."""
    t = time.perf_counter()
    hand = _FINDER.landmarks_only(decode(path, Letterbox(256)), LAST_STAGE)
    ms = 1000 * (time.perf_counter() - t)
    if hand is None:
        return False, np.zeros((21, 3), np.float32), np.zeros((21, 3), np.float32), ms
    return True, hand.points, hand.world, ms


def add_last_stage(r, files, models, workers, key):
    """The last stage, run only where every other pass found nothing (where the cascade would reach it)."""
    if "last_found" in r:
        return r
    todo = np.flatnonzero(~r["found"].any(1))
    with ProcessPoolExecutor(workers, initializer=_init, initargs=(models,)) as pool:
        rows = list(pool.map(last_stage, [files[i] for i in todo], chunksize=4))
    n = len(r["found"])
    r["last_found"], r["last_ms"] = np.zeros(n, bool), np.zeros(n, np.float32)
    r["last_points"], r["last_world"] = np.zeros((n, 21, 3), np.float32), np.zeros((n, 21, 3), np.float32)
    for i, (found, points, world, ms) in zip(todo, rows):
        r["last_found"][i], r["last_points"][i], r["last_world"][i], r["last_ms"][i] = found, points, world, ms
    np.savez(key, **r)
    return r


def first_of(r, order):
    """For each image, the index of the first pass in `order` that found a hand, or -1."""
    pick = np.full(len(r["found"]), -1)
    for k in reversed(order):
        pick = np.where(r["found"][:, k], k, pick)
    return pick


def rule_picks(r):
    """Rule name -> (per image: the pass whose hand is used or -1, per image: the passes that ran)."""
    palm = list(range(len(PALM_STAGES)))
    lo = len(PASSES) - 1
    cascade, only = first_of(r, palm), np.where(r["found"][:, lo], lo, -1)
    n = len(cascade)
    ran_cascade = np.array([[k <= (c if c >= 0 else palm[-1]) for k in range(len(PASSES))] for c in cascade])
    ran_cascade[:, lo] = False
    rules = {
        "cascade (palm stages only)": (cascade, ran_cascade),
        "landmarks only": (only, np.eye(len(PASSES), dtype=bool)[np.full(n, lo)]),
    }
    then = np.where(cascade >= 0, cascade, only)
    ran = ran_cascade.copy()
    ran[:, lo] = cascade < 0
    rules["cascade, then landmarks only"] = (then, ran)
    last = np.where((then < 0) & r["last_found"], len(PASSES), then)  # index len(PASSES): the last stage's hand
    rules["foldercnn: cascade, landmarks only, full model + margin"] = (last, ran)
    both = ran_cascade.copy()
    both[:, lo] = True
    surer = np.where(
        (only >= 0) & ((cascade < 0) | (r["presence"][:, lo] > r["presence"][np.arange(n), np.maximum(cascade, 0)])),
        only,
        cascade,
    )
    rules["both, the surer presence"] = (surer, both)
    for t in (0.6, 0.8, 1.0):
        fill = r["fill"][np.arange(n), np.maximum(cascade, 0)]
        big = (cascade >= 0) & (fill >= t)
        pick = np.where(big & (only >= 0), only, then)
        ran = ran_cascade.copy()
        ran[:, lo] = (cascade < 0) | big
        rules[f"landmarks only where the hand box fills >= {t:.0%}"] = (pick, ran)
    return rules


def features_of(r, pick):
    """(rows with a hand, their points, their world points); pick len(PASSES) means the last stage's hand."""
    points = np.concatenate([r["points"], r["last_points"][:, None]], 1)
    world = np.concatenate([r["world"], r["last_world"][:, None]], 1)
    rows = np.flatnonzero(pick >= 0)
    return rows, points[rows, pick[rows]], world[rows, pick[rows]]


def fit_head(r, labels, pick, seed=0):
    """The hands recipe's own head (training/hands.py: standardised features, augmented views, the weight-decay
    search) on the rps/train hands `pick` chooses; a seeded 20% of them validate."""
    import torch

    from foldercnn.data.hands import FoundHands
    from foldercnn.models.registry import create_model
    from foldercnn.training.hands import probe_on_hands
    from foldercnn.training.recipes import get_recipe
    from foldercnn.training.run import RunContext

    found = FoundHands.empty(len(pick))
    rows, found.points[pick >= 0], found.world[pick >= 0] = features_of(r, pick)
    found.stage[rows] = 0
    val = np.random.default_rng(seed).random(len(pick)) < 0.2
    y = torch.from_numpy(labels.astype(np.int64))
    model = create_model("hand-landmarks", 3)
    quiet = RunContext(seed=seed)
    sides = [(found.take(np.flatnonzero(m)), y[torch.from_numpy(np.flatnonzero(m))]) for m in (~val, val)]
    probe_on_hands(model, sides[0], sides[1], get_recipe("hands"), quiet)
    model.eval()

    class Head:
        @staticmethod
        def predict(x):
            with torch.no_grad():
                return model(torch.from_numpy(x)).argmax(1).numpy()

    return Head


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--per-set", type=int, default=0, help="a seeded sample of each set (0: every image)")
    ap.add_argument("--models", choices=sorted(MODELS), default="lite")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--cache", type=Path, default=Path("/tmp/hand-passes"))
    args = ap.parse_args()
    classes = ["paper", "rock", "scissors"]
    sets = {"rps/train": args.data / "train", "rps/test": args.data / "test"}
    sets.update({p.name: p for p in sorted(args.photos.iterdir()) if p.is_dir()})
    results = {}
    for name, folder in sets.items():
        t = time.perf_counter()
        results[name] = collect(
            folder, classes, 0 if name == "rps/train" else args.per_set, args.models, args.workers, args.cache
        )
        print(f"{name}: {len(results[name][1])} images, passes in {time.perf_counter() - t:.0f} s", flush=True)
    train, train_labels = results.pop("rps/train")
    train_rules = rule_picks(train)
    print(f"\nMediaPipe {args.models} models; a head fitted per rule on the rps/train hands it finds")
    print(f"{'rule':<52}{'set':<14}{'found':>8}{'acc@found':>11}{'overall':>9}{'ms med':>8}{'ms p90':>8}")
    for rule, (train_pick, _) in train_rules.items():
        head = fit_head(train, train_labels, train_pick)
        for name, (r, labels) in results.items():
            pick, ran = rule_picks(r)[rule]
            rows, points, world = features_of(r, pick)
            right = head.predict(hand_features(points, world)) == labels[rows] if len(rows) else np.zeros(0, bool)
            ms = (r["ms"] * ran).sum(1)
            if "full model" in rule:  # it runs wherever the earlier stages found nothing
                ms = ms + np.where((ran[:, -1]) & ~r["found"].any(1), r["last_ms"], 0)
            print(
                f"{rule:<52}{name:<14}{len(rows) / len(pick):>8.1%}{right.mean() if len(rows) else 0:>11.1%}"
                f"{right.sum() / len(pick):>9.1%}{np.median(ms):>8.1f}{np.percentile(ms, 90):>8.1f}"
            )


if __name__ == "__main__":
    main()
