"""ONNX export against the PyTorch path, per model family: parity and speed, side by side in one process.

    python benchmarks/export.py --data ../shared/data/rps [--families fast,seed,probe] [--seed-epochs 2]

For each family a model is trained on train/ (the `seed` recipe for only --seed-epochs epochs: parity and
speed do not need a good model), exported to fp32 ONNX and int8 ONNX (calibrated on 100 training images), and
compared with `foldercnn.load(model)` on the 372 test/ + 33 validation/ images: max |probability difference|,
top-1 agreement and accuracy. Speed: single-image latency (median of 50) and batch-64 throughput, PyTorch
(2 threads) vs onnxruntime fp32 and int8 (2 threads), the configurations interleaved round by round because
the host's speed drifts. Ratios are against PyTorch in the same round.
"""

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

import foldercnn
from foldercnn.data.decode import decode_images, walk_images
from foldercnn.deploy.export import calibration_sample, export_onnx, median_seconds, quantize_int8
from foldercnn.deploy.onnx_predict import OnnxClassifier

RECIPES = {"fast": dict(recipe="fast"), "seed": dict(recipe="seed"), "probe": dict(recipe="probe")}


def labelled(folder, classes, size):
    files = [f for f in walk_images(folder, [])]
    array, good, _ = decode_images(files, size)
    truth = np.array([classes.index(Path(files[i]).relative_to(folder).parts[0]) for i in good])
    return array, truth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--families", default="fast,seed,probe")
    ap.add_argument("--seed-epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    foldercnn.runtime.setup(threads=2)
    work = Path(tempfile.mkdtemp(prefix="foldercnn-export-"))
    print(
        f"{'family':<9}{'format':<8}{'max |dp|':>10}{'top-1 same':>12}{'accuracy':>10}{'1-image ms':>12}"
        f"{'x PyTorch':>10}{'batch64 img/s':>15}{'x PyTorch':>10}"
    )
    for family in args.families.split(","):
        kw = RECIPES[family] | ({"epochs": args.seed_epochs} if family == "seed" else {})
        result = foldercnn.train(args.data / "train", work / family, seed=0, log=lambda *a: None, **kw)
        clf = foldercnn.load(result.model_path)
        fp32 = export_onnx(clf.model, clf.metadata, work / family / "model.onnx")
        calib, _ = calibration_sample(args.data / "train", clf.image_size, limit=100)
        int8 = quantize_int8(fp32, work / family / "model.int8.onnx", calib)
        test, truth = labelled(args.data / "test", clf.classes, clf.image_size)
        extra, truth2 = labelled(args.data / "validation", clf.classes, clf.image_size)
        images, truth = np.concatenate([test, extra]), np.concatenate([truth, truth2])
        runners = {"pytorch": clf.probabilities}
        for name, path in (("onnx", fp32), ("int8", int8)):
            runners[name] = OnnxClassifier(path, threads=2).probabilities
        reference = runners["pytorch"](images)
        one, batch = images[:1], images[:64]
        lat = {k: [] for k in runners}
        thr = {k: [] for k in runners}
        for r in range(args.rounds):  # interleaved, rotating the order each round
            order = list(runners)[r % 3 :] + list(runners)[: r % 3]
            for k in order:
                lat[k].append(median_seconds(runners[k], one, 50))
                thr[k].append(64 / median_seconds(runners[k], batch, 5))
        for k, run in runners.items():
            probs = reference if k == "pytorch" else run(images)
            ratio_l = statistics.median(a / b for a, b in zip(lat["pytorch"], lat[k]))
            ratio_t = statistics.median(b / a for a, b in zip(thr["pytorch"], thr[k]))
            diff = "-" if k == "pytorch" else f"{np.abs(probs - reference).max():.1e}"
            same = "-" if k == "pytorch" else f"{int((probs.argmax(1) == reference.argmax(1)).sum())}/{len(images)}"
            print(
                f"{family:<9}{k:<8}{diff:>10}{same:>12}{(probs.argmax(1) == truth).mean():>10.2%}"
                f"{1000 * statistics.median(lat[k]):>12.2f}{ratio_l:>9.2f}x{statistics.median(thr[k]):>15.0f}"
                f"{ratio_t:>9.2f}x",
                flush=True,
            )
    print(f"(models, ONNX files in {work})")


if __name__ == "__main__":
    main()
