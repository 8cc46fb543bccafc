"""The warm teaching worker's resident memory, stage by stage, in one process as the worker runs them: the backbone
loaded, every capture's features computed (or read from the store), the leave-one-burst-out estimate (with the
split's near-duplicate grouping, remembered for the Train that follows), and a training job.

    python benchmarks/worker_memory.py --photos ../shared/data/rps-photos/green-screen [--per-class 500]
        [--recipe transfer] [--store DIR]

The first PER_CLASS photos of each class folder are linked into a temporary teaching folder. Peak (ru_maxrss) and
current (VmRSS) resident memory are printed after each stage; a second run with the same --store reads the features
instead of computing them (the peak then shows what the estimate and the job add).
"""

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def line(stage, t0):
    print(
        f"{stage:<34} peak {peak_mb():7.0f} MB   now {current_mb():7.0f} MB   {time.perf_counter() - t0:6.1f} s",
        flush=True,
    )


def teaching_folder(photos, per_class, root):
    for c in sorted(p for p in Path(photos).iterdir() if p.is_dir()):
        (root / c.name).mkdir(parents=True)
        for f in sorted(c.iterdir())[:per_class]:
            (root / c.name / f.name).symlink_to(f.resolve())
    return root


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", required=True, help="a folder with one folder of photos per class")
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--recipe", default="probe")
    ap.add_argument("--store", help="the feature store (default: a temporary folder, so features are computed)")
    args = ap.parse_args()

    from foldercnn import runtime

    runtime.setup(threads=max(1, runtime.physical_cores() - 1))  # as the worker does
    from foldercnn.data.folders import scan_folder
    from foldercnn.events import Events
    from foldercnn.training.cached_probe import backbone_for, burst_estimates, train_cached
    from foldercnn.training.options import TrainOptions

    with tempfile.TemporaryDirectory() as tmp:
        data = teaching_folder(args.photos, args.per_class, Path(tmp) / "data")
        options = TrainOptions.of(recipe=args.recipe, seed=0, resume="ignore")
        t0 = time.perf_counter()
        backbone = backbone_for(options.make_recipe(), args.store or Path(tmp) / "store")
        backbone.warm_up()
        line("backbone loaded", t0)
        t0 = time.perf_counter()
        records = backbone.records(scan_folder(data), log=lambda _: None)
        line(f"{len(records.files)} records ({records.computed} computed)", t0)
        t0 = time.perf_counter()
        burst_estimates(records)
        line("estimate (with the split's groups)", t0)
        t0 = time.perf_counter()
        train_cached(data, Path(tmp) / "run", options, backbone, Events())
        line("training job", t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
