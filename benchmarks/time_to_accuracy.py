"""Time to accuracy on Rock-Paper-Scissors: the `fast` recipe against the tutorial's `seed` recipe.

    python benchmarks/time_to_accuracy.py --data ../shared/data/rps [--seeds 0,1,2] [--no-scaling]

1. `fast` from a cold decode cache: wall-clock seconds from the raw folder to a saved model (decode and
   train separately) and test accuracy on test/ (372 images, never used for model selection); median and
   spread over the seeds.
2. The same with a warm cache.
3. The `seed` recipe given the same wall-clock budget as (1), and its test accuracy then.
4. Training throughput and achieved GFLOP/s of both recipes next to the machine's peak estimate.
5. Scaling: decode time, seconds per epoch and peak memory at 1x, 4x and 16x the training set (symlinks),
   each in a fresh subprocess.
6. Variants of `fast` side by side (--variants NAME=JSON;...: recipe overrides), warm cache, over the seeds,
   each beside today's recipe, with this run's training throughput as the yardstick of the host's speed.
Everything runs in one process (5 in children) on this machine, so the figures compare side by side.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import foldercnn
from foldercnn import runtime
from foldercnn.models.registry import create_model
from foldercnn.training.recipes import get_recipe


def quiet(*args):
    pass


def run_once(data, recipe, seed, cache, out, **kw):
    """Train from the folder into `out` with the decode cache at `cache`; returns figures."""
    os.environ["FOLDERCNN_CACHE"] = str(cache)
    t = time.perf_counter()
    result = foldercnn.train(data / "train", out, recipe=recipe, seed=seed, log=quiet, **kw)
    total = time.perf_counter() - t
    test = foldercnn.evaluate(foldercnn.load(result.model_path), data / "test")
    images = sum(h["images"] for h in result.history)
    train_s = sum(h["train_seconds"] for h in result.history)
    return {
        "total": total,
        "decode": result.seconds["data"],
        "train": total - result.seconds["data"],
        "test_accuracy": test.accuracy,
        "epochs": len(result.history),
        "img_per_s": images / train_s,
    }


def spread(values, fmt="{:.1f}"):
    return (
        f"median {fmt.format(statistics.median(values))} (min {fmt.format(min(values))}, max {fmt.format(max(values))})"
    )


def forward_flops(model, size):
    """Multiply-adds x 2 of convolutions and linear layers for one image."""
    flops = []

    def hook(m, i, o):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            flops.append(2 * k * o.numel())
        elif isinstance(m, nn.Linear):
            flops.append(2 * m.in_features * m.out_features)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return sum(flops)


def peak_estimate():
    info = Path("/proc/cpuinfo").read_text()
    mhz = max(float(m) for m in re.findall(r"cpu MHz\s*:\s*([\d.]+)", info)) if "cpu MHz" in info else 0.0
    flags = set(re.search(r"flags\s*:\s*(.*)", info).group(1).split()) if "flags" in info else set()
    cores = runtime.physical_cores()
    # two FMA pipes of 256 bits (AVX-512 runs double-pumped on Zen 4): 2 x 8 fp32 lanes x 2 FLOPs
    fp32_per_cycle = 32 if ("avx512f" in flags or "avx2" in flags) else 8
    bf16_per_cycle = 2 * fp32_per_cycle if "avx512_bf16" in flags else fp32_per_cycle
    how = (
        f"{cores} cores x {mhz / 1000:.2f} GHz x {fp32_per_cycle} FP32 FLOPs/cycle "
        f"(2 FMA pipes x 8 fp32 lanes x 2); bf16 dot products (avx512_bf16) x2 = {bf16_per_cycle}"
    )
    if "amx_bf16" in flags:  # matrix tiles: many times the vector units' bf16 rate, not modelled here
        how += "; AMX tiles (amx_bf16) are not counted, so bf16 runs can exceed this peak"
    return cores * mhz / 1000 * fp32_per_cycle, cores * mhz / 1000 * bf16_per_cycle, how


def scaling_child(data, factor, out):
    """Runs in a subprocess: link the training set `factor` times, decode, train 1 epoch, report."""
    tmp = Path(out)
    for cls in sorted(p.name for p in (data / "train").iterdir() if p.is_dir()):
        (tmp / "train" / cls).mkdir(parents=True)
        for k in range(factor):
            for f in (data / "train" / cls).iterdir():
                (tmp / "train" / cls / f"{k}_{f.name}").symlink_to(f.resolve())
    os.environ["FOLDERCNN_CACHE"] = str(tmp / "cache")
    runtime.setup()
    t = time.perf_counter()
    result = foldercnn.train(tmp / "train", tmp / "run", recipe="fast", epochs=1, seed=0, log=quiet)
    total = time.perf_counter() - t
    h = result.history[0]
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak
    status = Path("/proc/self/status").read_text()
    peak = int(re.search(r"VmHWM:\s*(\d+)", status).group(1)) / 1024
    cache_mb = sum(p.stat().st_size for p in (tmp / "cache").rglob("*.npy")) / 2**20
    print(
        json.dumps(
            {
                "factor": factor,
                "images": result.n_train + result.n_val,
                "decode": result.seconds["data"],
                "epoch": h["seconds"],
                "total": total,
                "peak_mb": peak,
                "cache_mb": cache_mb,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/rps")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parts", default="1,2,3,4,5", help="which parts to run (3 and 4 need 1)")
    ap.add_argument(
        "--variants",
        default='tta={"tta": true};ema={"ema": 0.99};tta+ema={"tta": true, "ema": 0.99}',
        help="part 6: NAME=JSON recipe overrides, separated by ';'",
    )
    ap.add_argument("--scaling-child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    data = Path(args.data).resolve()
    if args.scaling_child:
        return scaling_child(data, args.scaling_child, args.child_out)
    seeds = [int(s) for s in args.seeds.split(",")]
    parts = {int(p) for p in args.parts.split(",")}
    runtime.setup()
    print(
        f"machine: {runtime.physical_cores()} physical cores, torch {torch.__version__}, "
        f"precision {runtime.resolve_precision('auto', torch.device('cpu'))}"
    )
    work = Path(tempfile.mkdtemp(prefix="foldercnn-bench-"))

    if parts & {1, 2, 3, 4}:
        compare_recipes(data, seeds, work)
    if 5 in parts:
        scaling(data)
    if 6 in parts:
        variants(data, seeds, work, args.variants)


def fast_runs(data, seeds, work, tag):
    runs = []
    for s in seeds:
        r = run_once(data, "fast", s, work / f"cache{s}", work / f"{tag}{s}")
        runs.append(r)
        print(
            f"   seed {s}: total {r['total']:.1f}s = decode {r['decode']:.1f}s + train {r['train']:.1f}s "
            f"({r['epochs']} epochs); test accuracy {r['test_accuracy']:.4f}",
            flush=True,
        )
    print(
        f"   total seconds {spread([r['total'] for r in runs])}; "
        f"test accuracy {spread([r['test_accuracy'] for r in runs], '{:.4f}')}"
    )
    return runs


def compare_recipes(data, seeds, work):
    print("\n1. fast recipe, cold cache (raw folder -> saved model)")
    cold = fast_runs(data, seeds, work, "cold")  # a fresh cache folder per seed
    print("\n2. fast recipe, warm cache")
    warm = fast_runs(data, seeds, work, "warm")  # the same cache folders, now filled

    budget = statistics.median(r["total"] for r in cold)
    print(f"\n3. seed recipe (the tutorial) with the same wall clock: --time-budget {budget:.1f}s")
    seed_run = run_once(data, "seed", seeds[0], work / "cache-seed", work / "seed", time_budget=budget)
    fast_acc = statistics.median(r["test_accuracy"] for r in cold)
    print(
        f"   seed recipe: {seed_run['epochs']} epoch(s), test accuracy {seed_run['test_accuracy']:.4f} "
        f"after {seed_run['total']:.1f}s"
    )
    print(
        f"   HEADLINE at equal time ({budget:.0f}s): fast {fast_acc:.4f} vs seed {seed_run['test_accuracy']:.4f} "
        f"test accuracy, ratio {fast_acc / max(seed_run['test_accuracy'], 1e-9):.2f}x"
    )
    seed_recipe = get_recipe("seed")
    seed_full = seed_recipe.epochs * seed_recipe.steps_per_epoch * seed_recipe.batch_size / seed_run["img_per_s"]
    print(
        f"   the seed recipe's full 25 epochs would take ~{seed_full:.0f}s here: "
        f"{seed_full / budget:.1f}x the fast recipe's time"
    )

    print("\n4. throughput")
    peak32, peak16, how = peak_estimate()
    print(f"   peak estimate: {peak32:.0f} GFLOP/s fp32, {peak16:.0f} GFLOP/s bf16 ({how})")
    for name, img_s in (
        ("fast", statistics.median(r["img_per_s"] for r in cold + warm)),
        ("seed", seed_run["img_per_s"]),
    ):
        rec = get_recipe(name)
        fwd = forward_flops(create_model(rec.model, 3, **rec.model_args), rec.image_size)
        achieved = img_s * 3 * fwd / 1e9  # forward + backward ~ 3x forward
        print(
            f"   {name}: {img_s:.0f} training img/s at {rec.image_size}px; {fwd / 1e6:.0f} MFLOP forward/img; "
            f"~{achieved:.0f} GFLOP/s achieved ({achieved / peak16:.0%} of bf16 peak)"
        )

    print(
        "   (the peak is an estimate from the reported clock; achieved figures above 100% mean the CPU runs\n"
        "    faster than the reported MHz or retires more bf16 work per cycle than assumed)"
    )


def variant(text):
    """Recipe overrides from JSON; an "augment" object changes only the fields it names of fast's augmentation."""
    overrides = json.loads(text)
    if isinstance(overrides.get("augment"), dict):
        overrides["augment"] = replace(get_recipe("fast").augment, **overrides["augment"])
    return overrides


def variants(data, seeds, work, spec):
    """Part 6: today's fast recipe and each variant, seed by seed, on the same warm decode cache."""
    named = [("fast (today)", {})] + [(n, variant(j)) for n, j in (v.split("=", 1) for v in spec.split(";"))]
    print("\n6. variants of the fast recipe (train s: from decoded images to the saved model; decode is part 1's)")
    rows = {}
    for s in seeds:
        for name, overrides in named:
            r = run_once(data, "fast", s, work / f"cache{s}", work / f"variant-{len(rows)}-{s}", **overrides)
            rows.setdefault(name, []).append(r)
            print(
                f"   seed {s} {name:<14} train {r['train']:6.1f}s  {r['epochs']} epochs  {r['img_per_s']:6.0f} img/s"
                f"  test accuracy {r['test_accuracy']:.4f}",
                flush=True,
            )
    for name, runs in rows.items():
        acc = [r["test_accuracy"] for r in runs]
        print(
            f"   {name:<14} test accuracy {spread(acc, '{:.4f}')}; train s {spread([r['train'] for r in runs])}; "
            f"yardstick {statistics.median(r['img_per_s'] for r in runs):.0f} training img/s"
        )


def scaling(data):
    print("\n5. scaling (fresh subprocess each; cold cache; 1 epoch of the fast recipe)")
    print(
        f"   {'factor':>6} {'images':>7} {'decode s':>9} {'epoch s':>8} {'s/1k img':>9} {'peak RSS MB':>12} "
        f"{'cache MB':>9}"
    )
    for factor in (1, 4, 16):
        with tempfile.TemporaryDirectory(prefix="foldercnn-scale-") as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--data", str(data), "--scaling-child", str(factor), "--child-out", tmp],
                capture_output=True,
                text=True,
            )
            if out.returncode:
                print(out.stderr[-2000:])
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"   {factor:>5}x {r['images']:>7} {r['decode']:>9.1f} {r['epoch']:>8.1f} "
                f"{1000 * r['epoch'] / (0.8 * r['images']):>9.2f} {r['peak_mb']:>12.0f} {r['cache_mb']:>9.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
