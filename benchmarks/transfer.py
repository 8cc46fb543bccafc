"""Transfer learning on Rock-Paper-Scissors: pretrained EfficientNet-Lite0, linear probe and fine-tuning.

    python benchmarks/transfer.py --data ../shared/data/rps [--seeds 0,1,2] [--fine-tune-epochs 1]
        [--runs transfer,transfer-whole,probe,fine-tune,fast]

Per seed (the seed picks the 20% validation split carved from train/ and the head's initialisation):
wall clock from the raw folder to a saved model (decode, feature extraction, head fitting, fine-tuning),
then test accuracy on test/ (372 images, never used for selection). Then single-image predict latency and
batch throughput of the resulting model file, and the `fast` recipe's figures beside them.
The yardstick, before and after the runs: frozen EfficientNet-Lite0 forward passes at 224 px in the training
precision (images/s), a fixed workload whose figure shows a slower host or one that drifted during the runs.
Each run starts with a cold decode cache. `transfer`: the recipe (a probe, then 2 fine-tuning epochs at 112 px);
`transfer-whole` the same with nothing kept of the frozen layers (KEEP_MAX_BYTES 0), so every pass after the probe
runs the whole network; `probe`: the probe recipe (224 px), `fine-tune` that recipe with --fine-tune.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import foldercnn
from foldercnn import runtime
from foldercnn.models.registry import create_model
from foldercnn.training import transfer


def quiet(*args):
    pass


def run(data, work, seed, recipe, keep=True, **kw):
    transfer.KEEP_MAX_BYTES = 1 << 30 if keep else 0
    name = f"{recipe}-{seed}-{len(list(work.iterdir()))}"  # a new folder and cache for every run
    os.environ["FOLDERCNN_CACHE"] = str(work / f"cache-{name}")  # cold every time
    lines = []
    t = time.perf_counter()
    result = foldercnn.train(data / "train", work / name, recipe=recipe, seed=seed, log=lines.append, **kw)
    total = time.perf_counter() - t
    acc = foldercnn.evaluate(foldercnn.load(result.model_path), data / "test").accuracy
    feat = next((line for line in lines if str(line).startswith("features:")), "")
    head = next((line for line in lines if str(line).startswith("head fitted")), "")
    return {
        "total": total,
        "decode": result.seconds["data"],
        "acc": acc,
        "path": result.model_path,
        "features": feat.split(" in ")[-1] if feat else "-",
        "head": head.split(" in ")[1].split(" ")[0] if head else "-",
    }


def yardstick(precision, batches=3):
    """Images per second of a fixed workload: EfficientNet-Lite0 at 224 px, batch 32, no gradients."""
    device = torch.device("cpu")
    model = create_model("effnet-lite0", 3).eval()
    x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), runtime.autocast(device, precision):
        model(x)
        t = time.perf_counter()
        for _ in range(batches):
            model(x)
    return batches * len(x) / (time.perf_counter() - t)


def latency(model_path, images):
    clf = foldercnn.load(model_path)
    clf.predict(images[0])
    times = []
    for im in images[:20]:
        t = time.perf_counter()
        clf.predict(im)
        times.append(time.perf_counter() - t)
    batch = torch.from_numpy(np.stack([clf.decode(im) for im in images[:64]]))
    clf.probabilities(batch)
    t = time.perf_counter()
    clf.probabilities(batch)
    return statistics.median(times) * 1000, len(batch) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/rps")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fine-tune-epochs", type=int, default=1)
    ap.add_argument(
        "--runs",
        default="transfer,probe,fast",
        help="which of transfer, transfer-whole, probe, fine-tune, fast to run",
    )
    args = ap.parse_args()
    data = Path(args.data).resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    runtime.setup()
    precision = runtime.resolve_precision("auto", torch.device("cpu"))
    print(
        f"machine: {runtime.physical_cores()} physical cores, torch {torch.__version__}, precision {precision}; "
        f"yardstick {yardstick(precision):.0f} img/s (EfficientNet-Lite0 forward, 224 px, batch 32)"
    )
    work = Path(tempfile.mkdtemp(prefix="foldercnn-transfer-"))
    test_images = sorted((data / "test").rglob("*.png"))[::6]
    rows = {}
    runs = {
        "transfer": ("transfer: probe + 2 ep at 112 px", "transfer", {}),
        "transfer-whole": ("  the same, nothing kept", "transfer", {"keep": False}),
        "probe": ("probe: linear probe at 224 px", "probe", {}),
        "fine-tune": (
            f"probe + fine-tune {args.fine_tune_epochs} ep",
            "probe",
            {"fine_tune": True, "epochs": args.fine_tune_epochs},
        ),
        "fast": ("fast recipe (from scratch)", "fast", {}),
    }
    for label, recipe, kw in (runs[name] for name in args.runs.split(",")):
        print(f"\n{label}:")
        results = []
        for s in seeds:
            r = run(data, work, s, recipe, **kw)
            results.append(r)
            print(
                f"   seed {s}: total {r['total']:.1f}s (decode {r['decode']:.1f}s, features {r['features']}, "
                f"head {r['head']}); test accuracy {r['acc']:.4f}",
                flush=True,
            )
        ms, ips = latency(results[0]["path"], test_images)
        rows[label] = (results, ms, ips)
        print(f"   predict: {ms:.1f} ms per single image (decode included), {ips:.0f} img/s in a batch of 64")
    print(
        f"\n{'':30} {'total s (median)':>17} {'test acc median':>16} {'min-max':>14} {'1-image ms':>11} "
        f"{'batch img/s':>12}"
    )
    for label, (results, ms, ips) in rows.items():
        accs = [r["acc"] for r in results]
        print(
            f"{label:30} {statistics.median(r['total'] for r in results):>17.1f} {statistics.median(accs):>16.4f} "
            f"{min(accs):>7.4f}-{max(accs):.4f} {ms:>11.1f} {ips:>12.0f}"
        )
    print(f"\nyardstick after the runs: {yardstick(precision):.0f} img/s")


if __name__ == "__main__":
    main()
