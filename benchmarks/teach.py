"""Teaching through the API: a few photos per class -> a model, how fast, how good, and what it costs /predict.

    python benchmarks/teach.py --photos ../shared/data/rps-photos [--sets sxsw,green-screen] [--counts 10,20,50]
        [--recipe transfer] [--seed 0]

For each real-photo set: starts a real `foldercnn teach EMPTY_DIR` server (its default recipe unless --recipe),
adds the set's classes, then posts photos drawn at random (with the seed) through POST /teach/classes/{c}/images,
one request per photo as the page's "Add photos" does, growing to each count per class in turn; after each,
POST /teach/train and waits for the job. Per count: the job's wall-clock seconds as the page shows them (subprocess
start, decoding, feature extraction, head, calibration, report), the held-out accuracy the page shows, and the
accuracy of the served model on the rest of the set — all of it, and without the near-twins (near-duplicate
group mates, data/duplicates.py) of the posted photos, which would flatter it.

Then /predict latency: one client posting one photo at a time, as the page's camera view does (sequential, a few
per second), 40 requests while idle and as many as fit while a training job runs, side by side on the same server.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

import foldercnn
from foldercnn.data.duplicates import near_duplicate_groups
from foldercnn.data.folders import load_folder, scan_folder


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(data_dir, runs, recipe):
    port = free_port()
    cmd = [sys.executable, "-m", "foldercnn", "teach", str(data_dir), "--teach-runs", str(runs), "--port", str(port)]
    if recipe:
        cmd += ["--teach-recipe", recipe]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit("the teach server did not start")


def post_photo(url, cls, path):
    r = httpx.post(f"{url}/teach/classes/{cls}/images", files=[("files", (path.name, path.read_bytes()))], timeout=60)
    r.raise_for_status()


def train(url, during=None):
    """POST /teach/train and wait; `during(job_is_running)` runs while it trains. Returns the finished job."""
    job = httpx.post(url + "/teach/train", timeout=60).json()
    running = lambda: httpx.get(f"{url}/teach/train/{job['id']}", timeout=60).json()["state"] == "running"
    if during is not None:
        during(running)
    while running():
        time.sleep(0.2)
    done = httpx.get(f"{url}/teach/train/{job['id']}", timeout=60).json()
    if done["state"] != "done":
        raise SystemExit(f"training failed: {done['error']}")
    return done


def latencies(url, photo, keep_going, limit=40):
    times = []
    data = photo.read_bytes()
    while keep_going() and len(times) < limit:
        t = time.perf_counter()
        httpx.post(url + "/predict", files=[("files", ("p.jpg", data))], timeout=60).raise_for_status()
        times.append(time.perf_counter() - t)
        time.sleep(0.1)
    return np.array(times) * 1000


def correct(model_path, paths, labels, classes):
    """Right (True) or wrong, per image."""
    predicted = [p.label for p in foldercnn.load(model_path).predict_many([str(p) for p in paths])]
    return np.array([p == classes[y] for p, y in zip(predicted, labels)])


def bench_set(folder, counts, recipe, seed, work):
    data = load_folder(scan_folder(folder), 64)
    groups = near_duplicate_groups(data.images, data.paths)
    labels, paths = data.labels.numpy(), [Path(p) for p in data.paths]
    rng = random.Random(seed)
    # every class's photos in a random order: the first n of each are the ones posted
    order = {
        c: rng.sample([i for i in range(len(paths)) if labels[i] == c], int((labels == c).sum()))
        for c in range(len(data.classes))
    }
    teach_dir, runs = Path(work) / f"{folder.name}-teach", Path(work) / f"{folder.name}-runs"
    proc, url = start(teach_dir, runs, recipe)
    rows = []
    try:
        for c in data.classes:
            httpx.post(url + "/teach/classes", json={"name": c}).raise_for_status()
        posted = {c: 0 for c in range(len(data.classes))}
        for n in counts:
            for c in posted:
                for i in order[c][posted[c] : n]:
                    post_photo(url, data.classes[c], paths[i])
                posted[c] = n
            job = train(url)
            used = {i for c in posted for i in order[c][: posted[c]]}
            rest = [i for i in range(len(paths)) if i not in used]
            twins = {int(groups[i]) for i in used}
            far = [i for i in rest if int(groups[i]) not in twins]  # not a near-twin of a posted photo
            right = correct(job["result"]["model"], [paths[i] for i in rest], labels[rest], data.classes)
            is_far = np.array([int(groups[i]) not in twins for i in rest])
            rows.append(
                {
                    "n": n,
                    "job_s": job["seconds"],
                    "train_s": job["result"]["train_seconds"],
                    "held_out": job["result"]["val_accuracy"],
                    "n_val": job["result"]["n_val"],
                    "rest": right.mean(),
                    "n_rest": len(rest),
                    "far": right[is_far].mean(),
                    "n_far": len(far),
                }
            )
            r = rows[-1]
            print(
                f"{folder.name:<14}{n:>6}{r['job_s']:>8.1f}{r['train_s']:>9.1f}{r['held_out']:>10.1%} "
                f"({r['n_val']:>3}){r['rest']:>10.1%} ({r['n_rest']:>4}){r['far']:>10.1%} ({r['n_far']:>4})",
                flush=True,
            )
        photo = paths[order[0][-1]]
        idle = latencies(url, photo, lambda: True)
        busy = []
        train(url, during=lambda running: busy.extend(latencies(url, photo, running, limit=1000)))
        return rows, idle, np.array(busy)
    finally:
        proc.terminate()
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", required=True, help="folder of real-photo sets (each with one folder per class)")
    ap.add_argument("--sets", default="sxsw,green-screen")
    ap.add_argument("--counts", default="10,20,50", help="photos per class, in increasing order")
    ap.add_argument("--recipe", help="the teach recipe (default: the server's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    print(f"{os.cpu_count()} CPUs; torch threads in the training subprocess: its default")
    print(
        f"{'set':<14}{'n/class':>6}{'job s':>8}{'train s':>9}{'held-out':>10} (n)  {'rest':>8} (n)  "
        f"{'rest w/o twins':>14} (n)"
    )
    with tempfile.TemporaryDirectory() as work:
        for name in args.sets.split(","):
            rows, idle, busy = bench_set(Path(args.photos) / name, counts, args.recipe, args.seed, work)
            print(
                f"  /predict latency, one client, {name}: idle median {np.median(idle):.0f} ms "
                f"(p90 {np.percentile(idle, 90):.0f}, n={len(idle)}); during training median "
                f"{np.median(busy):.0f} ms (p90 {np.percentile(busy, 90):.0f}, n={len(busy)}); "
                f"ratio of medians {np.median(busy) / np.median(idle):.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
