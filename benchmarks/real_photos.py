"""Real photos of hands: how models trained on the tutorial's CGI images do on them, and real -> real.

    python benchmarks/real_photos.py --data ../shared/data/rps --photos ../shared/data/rps-photos \
        [--recipes fast,transfer,transfer+fine-tune,robust,robust+fine-tune,robust@effnet-lite2] [--seeds 0,1,2]
        [--real-to-real transfer+fine-tune,robust] [--keep DIR]

A recipe is NAME[@MODEL][+fine-tune]: robust@effnet-lite2 is the robust recipe with EfficientNet-Lite2.

CGI -> real: each recipe trains on rps/train only (validation split carved from it), then is evaluated on
rps/test and on every real-photo set under --photos. Per recipe and seed: training seconds; accuracy and the
expected calibration error (ECE, calibrated probabilities) per set; the share of wrong answers flagged uncertain,
and flagged uncertain or unfamiliar; the share of images with a hand found (landmark models; 100% for image
models), the share flagged neither uncertain nor unfamiliar ("kept") and the accuracy on those. Then the mean
over seeds.

--recipes "" skips this part. --real-to-real RECIPES: the real set named by --halves (default sxsw) is cut in
two halves by near-duplicate group (copies of one source frame stay on one side: data/duplicates.py); a model
trains on one half and is tested on the other, both ways; then across sets, training on one real set and
testing on another, both directions.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import foldercnn
from foldercnn.data.duplicates import near_duplicate_groups
from foldercnn.data.folders import group_split, load_folder, scan_folder


def train_and_time(train_dir, out, recipe, seed):
    """recipe: NAME[@MODEL][+fine-tune], e.g. robust@effnet-lite2 (another architecture of the same kind)."""
    name, fine_tune = recipe.split("+")[0], True if "+fine-tune" in recipe else None  # None: the recipe's own
    name, _, model = name.partition("@")
    t = time.perf_counter()
    result = foldercnn.train(
        train_dir, out, recipe=name, model=model or None, seed=seed, fine_tune=fine_tune, log=lambda *a: None
    )
    return foldercnn.load(result.model_path), time.perf_counter() - t


def measure(classifier, folder):
    ev = foldercnn.evaluate(classifier, folder)
    f = ev.flags
    errors = max(f["errors"], 1)
    return {
        "acc": ev.accuracy,
        "ece": ev.calibration["calibrated"]["ece"],
        "unc": f["errors_flagged"]["uncertain"] / errors,
        "either": f["errors_flagged"]["either"] / errors,
        "flagged": f["share_either"],
        "hand": ev.hands["coverage"] if ev.hands else 1.0,
        "sel": f["selective_accuracy"] or 0.0,
    }


COLUMNS = "acc   ECE  err:unc err:flag  hand  kept  acc:kept"


def print_rows(rows, sets):
    head = f"{'recipe':<26}{'seed':>5}{'train s':>9}" + "".join(f"{s[:16]:>58}" for s in sets)
    print(head)
    print(" " * 40 + "".join(f"{COLUMNS:>58}" for _ in sets))
    for r in rows:
        print(
            f"{r['recipe']:<26}{r['seed']:>5}{r['seconds']:>9.0f}"
            + "".join(
                f"{r[s]['acc']:>12.1%}{r[s]['ece']:>7.3f}{r[s]['unc']:>8.0%}{r[s]['either']:>7.0%}"
                f"{r[s]['hand']:>8.0%}{1 - r[s]['flagged']:>6.0%}{r[s]['sel']:>10.1%}"
                for s in sets
            )
        )


def halves(folder, work, seed=0):
    """Two symlink folders holding the halves of FOLDER, split by near-duplicate group."""
    data = load_folder(scan_folder(folder), 64)
    a_idx, b_idx, _ = group_split(data.labels, near_duplicate_groups(data.images, data.paths), 0.5, seed)
    out = []
    for name, idx in (("A", a_idx), ("B", b_idx)):
        root = Path(work) / f"{Path(folder).name}-{name}"
        for i in idx.tolist():
            p = Path(data.paths[i])
            (root / p.parent.name).mkdir(parents=True, exist_ok=True)
            (root / p.parent.name / p.name).symlink_to(p.resolve())
        out.append(root)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--photos", required=True, type=Path)
    ap.add_argument("--recipes", default="fast,transfer,transfer+fine-tune,robust")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--real-to-real", default="", metavar="RECIPES")
    ap.add_argument("--halves", default="sxsw", help="the real set cut in halves for --real-to-real")
    ap.add_argument("--keep", type=Path, help="keep the run folders here (e.g. for benchmarks/unfamiliar.py --models)")
    args = ap.parse_args()
    foldercnn.runtime.setup()
    real = sorted(p for p in args.photos.iterdir() if p.is_dir() and not p.name.startswith("."))
    sets = {"rps/test": args.data / "test", **{p.name: p for p in real}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            tmp = args.keep
            tmp.mkdir(parents=True, exist_ok=True)
        print("== trained on rps/train (CGI); accuracy, ECE, share of wrong answers flagged uncertain / either")
        recipes = [r for r in args.recipes.split(",") if r]
        for recipe in recipes:
            for seed in map(int, args.seeds.split(",")):
                classifier, seconds = train_and_time(args.data / "train", Path(tmp) / f"{recipe}-{seed}", recipe, seed)
                row = {"recipe": recipe, "seed": seed, "seconds": seconds}
                row.update({name: measure(classifier, folder) for name, folder in sets.items()})
                rows.append(row)
                print_rows([row], list(sets))
        print("\nmean over seeds" if recipes else "")
        for recipe in recipes:
            mine = [r for r in rows if r["recipe"] == recipe]
            mean = {"recipe": recipe, "seed": len(mine), "seconds": np.mean([r["seconds"] for r in mine])}
            mean.update({s: {k: float(np.mean([r[s][k] for r in mine])) for k in mine[0][s]} for s in sets})
            print_rows([mean], list(sets))

        if args.real_to_real:
            print(f"\n== real -> real ({args.real_to_real}, seed 0)")
            cut = next((p for p in real if p.name == args.halves), real[0])
            a, b = halves(cut, tmp)
            pairs = [(a, b, f"{cut.name} half A -> half B"), (b, a, f"{cut.name} half B -> half A")]
            pairs += [(x, y, f"{x.name} -> {y.name}") for x in real for y in real if x != y]
            for recipe in args.real_to_real.split(","):
                for train_dir, test_dir, what in pairs:
                    classifier, seconds = train_and_time(
                        train_dir, Path(tmp) / f"r2r-{recipe}-{train_dir.name}", recipe, 0
                    )
                    m = measure(classifier, test_dir)
                    print(
                        f"{recipe:<26} {what:<40} train {seconds:>5.0f} s  accuracy {m['acc']:.1%}  "
                        f"ECE {m['ece']:.3f}  wrong flagged {m['either']:.0%}"
                    )


if __name__ == "__main__":
    main()
