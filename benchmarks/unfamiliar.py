"""Does the model know what it does not know? The uncertain and unfamiliar flags per recipe and per set.

    python benchmarks/unfamiliar.py --data ../shared/data/rps --photos ../shared/data/rps-photos \
        [--recipes fast,robust] [--seed 0] [--models RUN/model.safetensors ...]

Each recipe trains on rps/train (seed --seed), or --models gives model files already trained. For rps/test and
every real-photo set: accuracy; the mistakes flagged uncertain, unfamiliar and either (count of all mistakes);
the share of images flagged; the accuracy on the images no flag touches (selective accuracy); and how well each
score tells wrong answers from right ones (AUROC, 0.5 = chance). Then the cost of the score: prediction time
with and without it, side by side on the same images.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

import foldercnn
from foldercnn.data.folders import load_folder, scan_folder


def flag_rows(classifier, sets):
    print(
        f"{'set':<16}{'acc':>7}{'errors':>8}{'unc':>7}{'unf':>7}{'either':>8}{'flagged':>9}{'sel.acc':>9}"
        f"{'AUROC conf':>11}{'AUROC unf':>10}"
    )
    for name, folder in sets.items():
        ev = foldercnn.evaluate(classifier, folder)
        f = ev.flags
        e = f["errors_flagged"]
        auc = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        pct = lambda x: "n/a" if x is None else f"{x:.1%}"  # noqa: E731
        print(
            f"{name:<16}{ev.accuracy:>7.1%}{f['errors']:>8}{e['uncertain']:>7}{str(e['unfamiliar']):>7}"
            f"{e['either']:>8}{pct(f['share_either']):>9}{pct(f['selective_accuracy']):>9}"
            f"{auc(f['auroc_low_confidence']):>11}{auc(f['auroc_unfamiliarity']):>10}"
        )


def score_cost(classifier, folder, repeats=5):
    """Median seconds per batch of logits alone vs logits + unfamiliarity, alternated."""
    images = load_folder(scan_folder(folder), classifier.image_size).images[:256]
    plain, scored = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        classifier.logits(images)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        classifier.logits_and_unfamiliarity(images)
        scored.append(time.perf_counter() - t)
    p, s = sorted(plain)[repeats // 2], sorted(scored)[repeats // 2]
    print(
        f"score cost on {len(images)} images: {p * 1000:.0f} ms without, {s * 1000:.0f} ms with "
        f"(+{100 * (s / p - 1):.1f}%)"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--photos", type=Path)
    ap.add_argument("--recipes", default="fast,robust")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="*", type=Path, help="model files to measure instead of training")
    args = ap.parse_args()
    foldercnn.runtime.setup()
    torch.manual_seed(0)
    sets = {"rps/test": args.data / "test"}
    if args.photos:
        sets.update({p.name: p for p in sorted(args.photos.iterdir()) if p.is_dir() and not p.name.startswith(".")})
    with tempfile.TemporaryDirectory() as tmp:
        models = args.models or []
        if not models:
            for recipe in args.recipes.split(","):
                result = foldercnn.train(
                    args.data / "train", Path(tmp) / recipe, recipe=recipe, seed=args.seed, log=lambda *a: None
                )
                models.append(result.model_path)
        for path in models:
            classifier = foldercnn.load(path)
            print(f"\n== {path} (recipe {classifier.metadata['recipe']['name']})")
            flag_rows(classifier, sets)
            score_cost(classifier, args.data / "test")


if __name__ == "__main__":
    main()
