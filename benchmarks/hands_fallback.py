"""No hand found: answer nothing, or fall back to an image model? Both ways on real photos.

    python benchmarks/hands_fallback.py --data ../shared/data/rps --photos ../shared/data/rps-photos [--seed 0]

Trains `hands` and `robust` on rps/train, evaluates both on every real-photo set, and prints per set: `robust`
alone, `hands` with no answer where no hand is found (counted wrong), `hands` falling back to `robust` there, and
how often `robust` is right on the images without a hand.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import foldercnn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--photos", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    foldercnn.runtime.setup()
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            name: foldercnn.load(
                foldercnn.train(
                    args.data / "train", Path(tmp) / name, recipe=name, seed=args.seed, log=lambda *a: None
                ).model_path
            )
            for name in ("hands", "robust")
        }
        for folder in sorted(p for p in args.photos.iterdir() if p.is_dir()):
            rows = {
                name: {r["path"]: r for r in foldercnn.evaluate(clf, folder).rows()} for name, clf in models.items()
            }
            paths = sorted(rows["hands"])
            found = np.array([rows["hands"][p]["predicted"] is not None for p in paths])
            right = {
                name: np.array([rows[name][p]["predicted"] == rows[name][p]["true"] for p in paths]) for name in rows
            }
            print(
                f"{folder.name}: robust alone {right['robust'].mean():.1%}; hands, no answer without a hand "
                f"{right['hands'].mean():.1%}; hands falling back to robust "
                f"{np.where(found, right['hands'], right['robust']).mean():.1%}; robust right on the "
                f"{(~found).sum()} images without a hand: {right['robust'][~found].mean():.1%}"
            )


if __name__ == "__main__":
    main()
