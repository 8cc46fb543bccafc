"""Calibration on Rock-Paper-Scissors: is a model's confidence right on the test images?

    python benchmarks/calibration.py --data ../shared/data/rps [--recipes fast,probe,seed] [--seeds 0,1,2]

For each recipe and seed: train on train/ (temperature fitted on the 20% validation split carved from it),
then evaluate on test/ (372 images, never used for training, selection or calibration). Prints accuracy,
the expected calibration error (ECE, 10 bins) and negative log-likelihood of the raw softmax (T = 1) and of
the temperature-scaled one, the temperature and the rule that chose it, and how many test predictions the
"uncertain" flag marks and how many of the mistakes it catches. The last table shows the flag's trade-off at
other thresholds for the first fast model.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import foldercnn


def run(data, work, recipe, seed, epochs):
    kw = {"epochs": epochs} if epochs else {}
    result = foldercnn.train(
        data / "train", work / f"{recipe}-{seed}", recipe=recipe, seed=seed, log=lambda *a: None, **kw
    )
    meta_cal = foldercnn.load(result.model_path).metadata["calibration"]
    ev = foldercnn.evaluate(foldercnn.load(result.model_path), data / "test")
    return ev, meta_cal


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--recipes", default="fast,probe")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--seed-epochs", type=int, default=None, help="epochs for the seed recipe (default 25)")
    args = ap.parse_args()
    foldercnn.runtime.setup()
    rows, first_fast = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for recipe in args.recipes.split(","):
            for seed in map(int, args.seeds.split(",")):
                ev, cal = run(args.data, Path(tmp), recipe, seed, args.seed_epochs if recipe == "seed" else None)
                c, u = ev.calibration, ev.uncertain
                rows.append(
                    (
                        recipe,
                        seed,
                        ev.accuracy,
                        c["uncalibrated"]["ece"],
                        c["calibrated"]["ece"],
                        c["uncalibrated"]["nll"],
                        c["calibrated"]["nll"],
                        c["temperature"],
                        cal["val_errors"],
                        u["count"],
                        u["errors_flagged"],
                        u["errors"],
                        cal["rule"],
                    )
                )
                print(
                    f"{recipe} seed {seed}: accuracy {ev.accuracy:.4f}, ECE {rows[-1][3]:.4f} -> {rows[-1][4]:.4f}, "
                    f"NLL {rows[-1][5]:.4f} -> {rows[-1][6]:.4f}, T {rows[-1][7]:.3f} ({cal['rule']})",
                    flush=True,
                )
                if recipe == "fast" and first_fast is None:
                    first_fast = ev
    print(
        "\n| recipe | seed | test acc | ECE raw | ECE calibrated | NLL raw | NLL calibrated | T | val errors "
        "| uncertain (<0.8) | mistakes caught |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r[0]} | {r[1]} | {r[2]:.4f} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.4f} | {r[6]:.4f} | {r[7]:.3f} "
            f"| {r[8]} | {r[9]} | {r[10]}/{r[11]} |"
        )
    if first_fast is not None:
        probs = np.asarray(first_fast.probabilities)
        conf, wrong = probs.max(1), probs.argmax(1) != np.asarray(first_fast.y_true)
        print("\nuncertain-flag trade-off, first fast model (calibrated probabilities):")
        print("| flag below | flagged | mistakes caught |\n|---|---|---|")
        for th in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95):
            flagged = conf < th
            print(
                f"| {th:.2f} | {int(flagged.sum())} of {len(conf)} | "
                f"{int((flagged & wrong).sum())} of {int(wrong.sum())} |"
            )


if __name__ == "__main__":
    main()
