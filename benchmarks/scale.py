"""Training at scale on one machine: folders many times the RPS training set, under a memory limit; DDP 1 vs 2.

    python benchmarks/scale.py --data ../shared/data/rps [--sizes 1,8,32] [--memory-limit-mb 800]
        [--steps 60] [--image-size 64] [--resume] [--ddp] [--work DIR]

Size sweep: for each size k, a folder of k symlinked copies of rps/train (k x 2,520 images), trained with the fast
recipe at one --image-size px (default 64, no progressive resizing) for --steps steps of batch 64 (image-by-image
split, 1% held out), in a child process placed in a memory cgroup limited to --memory-limit-mb (cgroup v2 or v1, when
this process may create one; otherwise the limit is not applied and the table says so). Decoded images live in the
memory-mapped decode cache (data/cache.py), so the cache may grow past the limit: the kernel drops its clean pages
instead of killing the run.
Per size: the decode seconds, training seconds per 1,000 images (the steps only), the child's peak RSS and the
cgroup's peak (RSS plus page cache charged to it), and the cache's size on disk.

--resume: the cost of surviving a crash, on 1x, fast at 64 px, 3 epochs: an uninterrupted run against one killed
(SIGKILL) halfway through its second epoch and run again with the same command; the checkpoint's size and the
seconds to read it.

--ddp: then one process vs two gloo processes (`train --nproc 2`, the same global batch) on 1x, seconds per 1,000
images. On 2 cores two processes share the same cores, so this shows the cost of the synchronisation, not a speed-up.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import foldercnn
foldercnn.runtime.setup()
data, out, steps, image_size, batch_size = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
t = time.perf_counter()
result = foldercnn.train(data, out, recipe="fast", image_size=image_size, batch_size=batch_size, epochs=1,
                         steps_per_epoch=steps, start_size=0, split="images", val_fraction=0.01, seed=0,
                         resume="ignore", log=lambda *a: None)
row = result.history[0]
print(json.dumps({"data_s": result.seconds["data"], "train_s": row["train_seconds"], "images": row["images"],
                  "total_s": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def scaled_copy(train_dir, k, work):
    """k symlinked copies of every image of train_dir, class by class."""
    root = Path(work) / f"rps-x{k}"
    if root.exists():
        return root
    for cls in sorted(p for p in Path(train_dir).iterdir() if p.is_dir()):
        (root / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir()):
            for c in range(k):
                (root / cls.name / f"c{c:02d}-{f.name}").symlink_to(f.resolve())
    return root


class MemoryCgroup:
    """A memory cgroup to run a child in (v2 memory.max, or v1 memory.limit_in_bytes), when permitted."""

    def __init__(self, limit_bytes):
        self.path, self.v2 = None, Path("/sys/fs/cgroup/cgroup.controllers").exists()
        base = Path("/sys/fs/cgroup") if self.v2 else Path("/sys/fs/cgroup/memory")
        path = base / f"foldercnn-scale-{os.getpid()}"
        try:
            path.mkdir()
            (path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(str(limit_bytes))
            self.path = path
        except OSError as e:
            self.reason = f"no memory cgroup ({e.strerror}): limit not applied"

    def enter(self, pid):
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))

    def peak_mb(self):
        if self.path is None:
            return None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text()) / 2**20
        except OSError:
            return None

    def reset_peak(self):
        if self.path is not None and not self.v2:
            (self.path / "memory.max_usage_in_bytes").write_text("0")

    def remove(self):
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def run_child(data, out, steps, group, image_size=64, batch_size=64, env=None):
    """Train `fast` on data in a child process inside the memory cgroup; its figures as a dict."""
    # the child starts stopped at a pipe read, is put in the cgroup, then let go: all its memory is charged there
    r, w = os.pipe()
    code = f"import os; os.read({r}, 1); " + "exec(compile(" + repr(CHILD) + ", 'scale-child', 'exec'))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(data), str(out), str(steps), str(image_size), str(batch_size)],
        pass_fds=(r,),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    os.close(r)
    group.enter(proc.pid)
    os.write(w, b"g")
    os.close(w)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        killed = " (SIGKILL: the memory limit's out-of-memory killer)" if proc.returncode == -9 else ""
        raise SystemExit(f"training child failed ({proc.returncode}){killed}: {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def cache_mb(cache_dir):
    return sum(f.stat().st_size for f in Path(cache_dir).rglob("*.npy")) / 2**20


def sweep(args, work):
    cache_dir = Path(work) / "cache"
    os.environ["FOLDERCNN_CACHE"] = str(cache_dir)  # a fresh decode cache: the decode seconds are real
    group = MemoryCgroup(args.memory_limit_mb * 2**20)
    limit = f"{args.memory_limit_mb} MB" if group.path else group.reason
    print(
        f"memory limit of the training child: {limit}; {args.steps} steps of batch 64 at {args.image_size} px, "
        "fast recipe"
    )
    print(
        f"{'size':>5}{'images':>9}{'decode s':>10}{'s/1000 img':>12}{'peak RSS MB':>13}{'cgroup peak MB':>16}"
        f"{'cache MB':>10}"
    )
    try:
        for k in [int(s) for s in args.sizes.split(",")]:
            data = scaled_copy(Path(args.data) / "train", k, work)
            n = sum(1 for p in data.rglob("*") if not p.is_dir())
            group.reset_peak()
            row = run_child(data, Path(work) / f"run-x{k}", args.steps, group, args.image_size)
            peak = group.peak_mb()
            print(
                f"{k:>4}x{n:>9}{row['data_s']:>10.1f}{1000 * row['train_s'] / row['images']:>12.2f}"
                f"{row['peak_rss_mb']:>13.0f}{peak if peak is not None else float('nan'):>16.0f}"
                f"{cache_mb(cache_dir):>10.0f}",
                flush=True,
            )
            for f in cache_dir.rglob("*.npy"):  # one size's cache at a time on disk
                f.unlink()
    finally:
        group.remove()


def resume_cost(args, work):
    import signal

    from foldercnn.training import checkpoint as ckpt

    data = scaled_copy(Path(args.data) / "train", 1, work)
    cmd = [
        sys.executable,
        "-m",
        "foldercnn",
        "train",
        str(data),
        "--recipe",
        "fast",
        "--image-size",
        "64",
        "--start-size",
        "0",
        "--epochs",
        "3",
        "--split",
        "images",
    ]
    print("\nresume: fast at 64 px, 1x, 3 epochs (checkpoint after every epoch)")
    t = time.perf_counter()
    subprocess.run(cmd + ["--out", str(Path(work) / "whole")], check=True, capture_output=True)
    whole = time.perf_counter() - t
    out = Path(work) / "killed"
    t = time.perf_counter()
    proc = subprocess.Popen(cmd + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / ckpt.FILE).exists() and proc.poll() is None:  # the first epoch's checkpoint
        time.sleep(0.05)
    first_epoch = time.perf_counter() - t
    time.sleep(first_epoch / 2)  # halfway through the second epoch (start-up included in the first)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - t
    size_mb = (out / ckpt.FILE).stat().st_size / 2**20
    r = time.perf_counter()
    ckpt.read(out / ckpt.FILE)
    read_s = time.perf_counter() - r
    t = time.perf_counter()
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    resumed = time.perf_counter() - t
    print(
        f"  uninterrupted: {whole:.1f} s; killed at {killed_at:.1f} s, then the same command: {resumed:.1f} s "
        f"(together {killed_at + resumed:.1f} s, {killed_at + resumed - whole:+.1f} s)"
    )
    print(f"  checkpoint {size_mb:.1f} MB, read in {1000 * read_s:.0f} ms")


def ddp(args, work):
    data = scaled_copy(Path(args.data) / "train", 1, work)
    print("\nDDP on this machine: the same global batch 64, 1x, 2 epochs")
    for nproc in (1, 2):
        out = Path(work) / f"ddp-{nproc}"
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "foldercnn",
                "train",
                str(data),
                "--out",
                str(out),
                "--recipe",
                "fast",
                "--image-size",
                "64",
                "--epochs",
                "2",
                "--split",
                "images",
                "--nproc",
                str(nproc),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t
        import csv

        rows = list(csv.DictReader(open(out / "history.csv")))
        print(
            f"  {nproc} process(es): {wall:.0f} s in all (2 epochs, start-up and report included), "
            f"final val_accuracy {float(rows[-1]['val_accuracy']):.4f}",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the RPS folder (train/ is used)")
    ap.add_argument("--sizes", default="1,8,32")
    ap.add_argument("--memory-limit-mb", type=int, default=800)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--work", help="folder for the copies, runs and cache (default: a temporary one)")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.sizes:
            sweep(args, work)
        if args.resume:
            resume_cost(args, work)
        if args.ddp:
            ddp(args, work)


if __name__ == "__main__":
    main()
