"""Teaching through the API: a few photos per class -> a model, how fast, how good, and what it costs /predict,
with the warm worker (the default) and with a cold `foldercnn train` subprocess per job, side by side.

    python benchmarks/teach.py --photos ../shared/data/rps-photos [--sets sxsw,green-screen] [--counts 10,20,50,500]
        [--recipe hands] [--seed 0] [--rest 600]

For each real-photo set: starts two real teaching servers on one folder, `foldercnn teach DIR` (warm) and
`foldercnn teach DIR --teach-cold`, adds the set's classes, then posts photos drawn at random (with the seed) through
the warm server's POST /teach/classes/{c}/images, one request per photo as the page's "Add photos" does, growing to
each count per class in turn. Per count, once the warm worker has featurised them: POST /teach/train on each server
and wait. Columns: Train -> the new model serving (warm: `served_seconds`; cold: the whole job), the job with its
report, the held-out accuracy the page shows, the accuracy of the served model on `--rest` other photos of the
set (the same ones for both; with their near-twins, near-duplicate group mates of the posted photos, left out: they
would flatter), and the warm worker's leave-one-burst-out estimate per class beside that class's rest accuracy.

Then, at the last count below 100: the first Train right after a server restart (the worker starting, its features
kept); /predict latency, one client posting one photo at a time as the page's camera view does, idle, while 20 new
photos are being featurised, and during a warm and a cold job; the worker's peak resident memory and the size of the
feature store per 1,000 captures. With --recipe hands the worker keeps the hand found in each capture (the cold job
then reads the hands the worker found from the shared hand cache, as a cold job does for captures seen before);
with a recipe that cannot keep features (e.g. fast) the warm server trains as the cold one does (no worker).
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


def start(data_dir, runs, recipe, cold=False):
    port = free_port()
    cmd = [sys.executable, "-m", "foldercnn", "teach", str(data_dir), "--teach-runs", str(runs), "--port", str(port)]
    if recipe:
        cmd += ["--teach-recipe", recipe]
    if cold:
        cmd += ["--teach-cold"]
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
        time.sleep(0.1)
    done = httpx.get(f"{url}/teach/train/{job['id']}", timeout=60).json()
    if done["state"] != "done":
        raise SystemExit(f"training failed: {done['error']}")
    return done


def overview(url):
    return httpx.get(url + "/teach/classes", timeout=60).json()


def wait_featurised(url, timeout=1200):
    """The warm worker's state once every image of the folder has its features (None without a worker)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        o = overview(url)
        images = sum(c["images"] for c in o["classes"])
        if o["warm"] is None or (o["warm"]["up_to_date"] and o["warm"]["images_featurised"] == images):
            return o
        time.sleep(0.5)
    raise SystemExit(f"features not ready after {timeout} s")


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


def served_seconds(job):
    return job["served_seconds"] if job.get("served_seconds") is not None else job["seconds"]


def latency_line(name, what, times, idle):
    return (
        f"  /predict latency, {name}, {what}: median {np.median(times):.0f} ms (p90 {np.percentile(times, 90):.0f}, "
        f"n={len(times)}), {np.median(times) / np.median(idle):.2f}x idle"
    )


class SetBench:
    """One real-photo set: the photos, their near-duplicate groups, the order they are posted in."""

    def __init__(self, folder, seed, rest):
        data = load_folder(scan_folder(folder), 64)
        self.name, self.classes = folder.name, data.classes
        self.groups = near_duplicate_groups(data.images, data.paths)
        self.labels, self.paths = data.labels.numpy(), [Path(p) for p in data.paths]
        rng = random.Random(seed)
        self.order = {  # every class's photos in a random order: the first n of each are the ones posted
            c: rng.sample([i for i in range(len(self.paths)) if self.labels[i] == c], int((self.labels == c).sum()))
            for c in range(len(self.classes))
        }
        self.rest_pick = random.Random(seed + 1)
        self.n_rest = rest

    def rest(self, used):
        """Up to n_rest photos, not posted and not a near-twin of a posted one (the same for both servers)."""
        twins = {int(self.groups[i]) for i in used}
        far = [i for i in range(len(self.paths)) if i not in used and int(self.groups[i]) not in twins]
        return sorted(self.rest_pick.sample(far, min(self.n_rest, len(far))))


def bench_set(bench, counts, recipe, work):
    teach_dir = Path(work) / f"{bench.name}-teach"
    warm_runs, cold_runs = Path(work) / f"{bench.name}-warm", Path(work) / f"{bench.name}-cold"
    warm, warm_url = start(teach_dir, warm_runs, recipe)
    cold, cold_url = start(teach_dir, cold_runs, recipe, cold=True)
    try:
        for c in bench.classes:
            httpx.post(warm_url + "/teach/classes", json={"name": c}).raise_for_status()
        posted = {c: 0 for c in range(len(bench.classes))}
        small = max([n for n in counts if n < 100], default=counts[0])
        for n in counts:
            t = time.perf_counter()
            for c in posted:
                for i in bench.order[c][posted[c] : n]:
                    post_photo(warm_url, bench.classes[c], bench.paths[i])
                posted[c] = n
            state = wait_featurised(warm_url)
            t_post = time.perf_counter() - t
            used = {i for c in posted for i in bench.order[c][: posted[c]]}
            rest = bench.rest(used)
            for mode, url in (("warm", warm_url), ("cold", cold_url)):
                job = train(url)
                photos = [bench.paths[i] for i in rest]
                right = correct(job["result"]["model"], photos, bench.labels[rest], bench.classes)
                per_class = {bench.classes[c]: right[bench.labels[rest] == c].mean() for c in range(len(bench.classes))}
                r = job["result"]
                print(
                    f"{bench.name:<13}{n:>5} {mode:<5}{served_seconds(job):>8.2f}{job['seconds']:>8.2f}"
                    f"{r['val_accuracy']:>9.1%} ({r['n_val']:>3}){right.mean():>9.1%} ({len(rest)})",
                    flush=True,
                )
            estimates = {c["name"]: c["estimate"] for c in state["classes"]}
            worker = overview(warm_url)["warm"] or {}
            print(
                f"    posting and featurising {n * len(posted)} photos: {t_post:.0f} s; warm worker's peak resident "
                f"memory after its job: {worker.get('worker_rss_mb')} MB; estimate vs rest per class: "
                + ", ".join(
                    f"{c} ~{_pct(estimates.get(c))} ({(estimates.get(c) or {}).get('bursts', 0)} bursts) vs "
                    f"{per_class[c]:.0%}"
                    for c in bench.classes
                ),
                flush=True,
            )
            if n == small:
                warm, warm_url = restarted_first_train(warm, teach_dir, warm_runs, recipe, bench.name)
                costs(bench, warm_url, cold_url, warm_runs, posted)
    finally:
        for proc in (warm, cold):
            proc.terminate()
            proc.wait(30)


def _pct(estimate):
    return "n/a" if not estimate or estimate.get("accuracy") is None else f"{estimate['accuracy']:.0%}"


def restarted_first_train(proc, teach_dir, runs, recipe, name):
    """Stop the warm server, start it again and press Train at once: the worker starts, its features kept."""
    proc.terminate()
    proc.wait(30)
    t = time.perf_counter()
    proc, url = start(teach_dir, runs, recipe)
    t_up = time.perf_counter() - t
    job = train(url)
    state = overview(url)["warm"] or {}
    print(
        f"    {name}: first Train after a server restart: server up in {t_up:.1f} s, then Train -> serving "
        f"{served_seconds(job):.2f} s (job {job['seconds']:.2f} s); features computed after the restart: "
        f"{state.get('features_computed')}",
        flush=True,
    )
    return proc, url


def costs(bench, warm_url, cold_url, warm_runs, posted):
    """/predict latency idle, while featurising, during a warm and a cold job; memory and the feature store."""
    photo = bench.paths[bench.order[0][-1]]
    idle = latencies(warm_url, photo, lambda: True)
    print(latency_line(bench.name, "idle", idle, idle), flush=True)
    extra = bench.order[0][-20:]  # photos posted at no count (unless one is almost the whole set), deleted after
    if extra:
        done = []

        def post_extra():
            for i in extra:
                post_photo(warm_url, bench.classes[0], bench.paths[i])
            done.append(True)

        import threading

        poster = threading.Thread(target=post_extra)
        poster.start()
        busy = latencies(warm_url, photo, lambda: not done or not overview(warm_url)["warm"]["up_to_date"], limit=1000)
        poster.join()
        print(latency_line(bench.name, f"while {len(extra)} new photos are featurised", busy, idle), flush=True)
        for capture in overview(warm_url)["classes"][0]["captures"][: len(extra)]:  # newest first: the extra ones
            httpx.delete(f"{warm_url}/teach/classes/{bench.classes[0]}/images/{capture}").raise_for_status()
        wait_featurised(warm_url)
    for mode, url in (("warm", warm_url), ("cold", cold_url)):
        busy: list = []
        train(url, during=lambda running, url=url, busy=busy: busy.extend(latencies(url, photo, running, limit=1000)))
        if len(busy):
            print(latency_line(bench.name, f"during a {mode} job", np.array(busy), idle), flush=True)
    state = overview(warm_url)["warm"]
    if state:
        store = sum(f.stat().st_size for f in (warm_runs / "features").rglob("*.safetensors"))
        kept = len(list((warm_runs / "features").rglob("*.safetensors")))
        print(
            f"    warm worker: peak resident memory {state['worker_rss_mb']:.0f} MB; feature store "
            f"{store / 1e6:.2f} MB for {kept} images = {store / kept * 1000 / 1e6:.1f} MB per 1,000 captures",
            flush=True,
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", required=True, help="folder of real-photo sets (each with one folder per class)")
    ap.add_argument("--sets", default="sxsw,green-screen")
    ap.add_argument("--counts", default="10,20,50,500", help="photos per class, in increasing order")
    ap.add_argument("--recipe", help="the teach recipe (default: the server's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rest", type=int, default=600, help="other photos of the set each model is measured on")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    import torch

    bf16 = "with" if torch.cpu._is_avx512_bf16_supported() else "without"
    print(f"{os.cpu_count()} CPUs, {bf16} native bf16; torch threads: each process's default")
    print(f"{'set':<13}{'n/cl':>5} {'mode':<5}{'served':>8}{'job s':>8}{'held-out':>9} (n){'rest':>10} (n)")
    with tempfile.TemporaryDirectory() as work:
        for name in args.sets.split(","):
            bench_set(SetBench(Path(args.photos) / name, args.seed, args.rest), counts, args.recipe, work)


if __name__ == "__main__":
    main()
