"""Load on `foldercnn serve`: throughput, latency and memory, then a burst with bad uploads mixed in.

    python benchmarks/serve_load.py --model /tmp/rps-fast/model.safetensors --images ../shared/data/rps/test
    python benchmarks/serve_load.py --images ../shared/data/rps/test     # trains a fast model first (~30 s)

Starts `foldercnn serve MODEL` as a subprocess on a free 127.0.0.1 port (default limits). For each number of
concurrent clients (threads, each with one keep-alive http.client connection) it sends a bounded number of
single-image POST /predict requests (real images from --images, read once into memory) and reports
requests/s (= images/s), p50/p95/p99 latency per request and errors; then the server's peak memory
(VmHWM of its process). Then a burst: --burst requests from 64 clients where every 4th upload is bad
(not an image, truncated, corrupt, decompression bomb, over the size limit, too many files, empty, not
multipart), each expected to be refused with its 4xx; the burst must give 0 server errors (5xx) and
the server must still be healthy and correct afterwards. The clients share the server's CPU cores.
"""

import argparse
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

from PIL import Image

BOUNDARY = "foldercnnbenchboundary"


def multipart(files):
    """[(filename, bytes)] -> (body, content type) of a multipart/form-data request with field 'files'."""
    out = io.BytesIO()
    for name, data in files:
        out.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={BOUNDARY}"


def png_claiming_size(width, height):
    """A small PNG whose header declares width x height: a decompression bomb's signature."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def bad_uploads(good_png, good_jpeg, max_file_bytes, max_files):
    """(body, content type, expected status, kind) for each kind of bad request."""
    bad = [
        ("not an image", multipart([("notes.png", b"just some text, not pixels\n" * 20)]), 415),
        ("truncated PNG", multipart([("cut.png", good_png[: len(good_png) // 2])]), 400),
        ("corrupt JPEG", multipart([("bad.jpg", good_jpeg[:20] + bytes(range(256)) * 8)]), 400),
        ("decompression bomb", multipart([("bomb.png", png_claiming_size(30000, 30000))]), 400),
        ("over the size limit", multipart([("huge.png", good_png[:16] + b"\0" * (max_file_bytes + 1))]), 413),
        ("too many files", multipart([(f"{i}.png", good_png) for i in range(max_files + 1)]), 413),
        ("empty file", multipart([("empty.png", b"")]), 400),
        ("not multipart", (good_png, "image/png"), 415),
    ]
    return [(body, content_type, expected, kind) for kind, (body, content_type), expected in bad]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, port, workers):
    cmd = [sys.executable, "-m", "foldercnn.cli", "serve", str(model), "--port", str(port)]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read()}")
        try:
            if request(port, "GET", "/healthz")[0] == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


class Connection(http.client.HTTPConnection):
    """A keep-alive connection with Nagle's algorithm off, as browsers and curl use (http.client writes a
    request's headers and body separately, which Nagle's algorithm can hold back)."""

    def __init__(self, port):
        super().__init__("127.0.0.1", port, timeout=60)

    def connect(self):  # also used when http.client reopens a connection the server closed
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def request(port, method, path, body=None, content_type=None, conn=None):
    """One request; returns (status, body bytes). Uses (and keeps) `conn` when given."""
    own = conn is None
    conn = conn or Connection(port)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


def peak_memory_mb(pid):
    """Peak and current resident memory of a process (Linux /proc)."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmHWM", float("nan")), fields.get("VmRSS", float("nan"))


def load(port, jobs, clients):
    """Send every job (body, content type, expected status, kind) from `clients` threads.

    Returns ([(seconds, status or exception name, expected status, kind)], wall seconds)."""
    records, lock, next_job = [], threading.Lock(), iter(range(len(jobs)))

    def client():
        conn = None
        while True:
            with lock:
                i = next(next_job, None)
            if i is None:
                break
            body, content_type, expected, kind = jobs[i]
            t = time.perf_counter()
            try:
                conn = conn or Connection(port)
                status, _ = request(port, "POST", "/predict", body, content_type, conn=conn)
            except (OSError, http.client.HTTPException) as e:  # a refused or reset connection: counted
                status = type(e).__name__
                conn.close()
                conn = None
            with lock:
                records.append((time.perf_counter() - t, status, expected, kind))
        if conn:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return records, time.perf_counter() - start


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def train_model(train_dir):
    out = Path(tempfile.mkdtemp(prefix="foldercnn-serve-bench-"))
    print(f"no --model: training the fast recipe on {train_dir} into {out} ...", flush=True)
    subprocess.run([sys.executable, "-m", "foldercnn.cli", "train", str(train_dir), "--out", str(out)], check=True)
    return out / "model.safetensors"


def direct_predict_ms(model, images, n=200):
    """Baseline in this process, no HTTP: Classifier.predict on the same bytes, one PyTorch thread (as each
    of the server's workers uses). Per-image latencies in ms."""
    import torch

    import foldercnn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clf = foldercnn.load(model)
        for _, data in images[:10]:
            clf.predict(data)
        times = []
        for i in range(n):
            t = time.perf_counter()
            clf.predict(images[i % len(images)][1])
            times.append((time.perf_counter() - t) * 1000)
        return times
    finally:
        torch.set_num_threads(threads)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model file (default: train the fast recipe on --train first)")
    ap.add_argument("--train", default="../shared/data/rps/train", help="training folder when no --model")
    ap.add_argument("--images", default="../shared/data/rps/test", help="folder of images to send (recursive)")
    ap.add_argument("--clients", default="1,8,64", help="concurrent clients per round (default 1,8,64)")
    ap.add_argument("--requests", type=int, default=400, help="requests per round (default 400)")
    ap.add_argument("--burst", type=int, default=1000, help="requests in the final burst (default 1000)")
    ap.add_argument("--workers", type=int, help="server inference threads (default: its own, one per core)")
    args = ap.parse_args()

    model = Path(args.model) if args.model else train_model(Path(args.train))
    paths = sorted(p for p in Path(args.images).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if not paths:
        raise SystemExit(f"no images under {args.images}")
    images = [(p.name, p.read_bytes()) for p in paths]
    good = [(*multipart([img]), 200, "good image") for img in images]
    baseline = direct_predict_ms(model, images)
    port = free_port()
    server = start_server(model, port, args.workers)
    try:
        print(
            f"server: foldercnn serve {model} on 127.0.0.1:{port} (pid {server.pid}); "
            f"{os.cpu_count()} CPUs shared by server and clients; {len(images)} images from {args.images}, "
            f"{statistics.mean(len(d) for _, d in images) / 1024:.0f} KB each on average\n"
        )
        load(port, good[:20], 1)  # warm up
        print(
            f"{'clients':>7} {'requests':>8} {'ok':>5} {'503':>5} {'errors':>6} {'req/s':>7} "
            f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'peak MB':>8}"
        )
        single_p50 = None
        for clients in (int(c) for c in args.clients.split(",")):
            jobs = [good[i % len(good)] for i in range(args.requests)]
            records, seconds = load(port, jobs, clients)
            ms = [t * 1000 for t, *_ in records]
            ok = sum(status == 200 for _, status, *_ in records)
            busy = sum(status == 503 for _, status, *_ in records)
            print(
                f"{clients:>7} {len(records):>8} {ok:>5} {busy:>5} {len(records) - ok - busy:>6} "
                f"{len(records) / seconds:>7.1f} "
                f"{percentile(ms, 50):>7.1f} {percentile(ms, 95):>7.1f} {percentile(ms, 99):>7.1f} "
                f"{peak_memory_mb(server.pid)[0]:>8.0f}"
            )
            if clients == 1:
                single_p50 = percentile(ms, 50)
        print(
            "(one image per request, so req/s = images/s; 503 = refused as busy; peak MB = the server "
            "process's peak resident memory so far, VmHWM)"
        )
        if single_p50 is not None:
            base = percentile(baseline, 50)
            print(
                f"baseline without HTTP (foldercnn.load(model).predict(bytes) in this process, 1 thread): p50 "
                f"{base:.1f} ms per image; one client through the server: {single_p50:.1f} ms "
                f"(ratio {single_p50 / base:.2f}x, HTTP + multipart + queueing {single_p50 - base:.1f} ms)"
            )

        good_png = next(d for n, d in images if d.startswith(b"\x89PNG"))
        buf = io.BytesIO()
        Image.open(io.BytesIO(good_png)).convert("RGB").save(buf, "JPEG")
        bad = bad_uploads(good_png, buf.getvalue(), max_file_bytes=10 * 1024 * 1024, max_files=16)  # serve's defaults
        jobs = [bad[(i // 4) % len(bad)] if i % 4 == 3 else good[i % len(good)] for i in range(args.burst)]
        records, seconds = load(port, jobs, 64)
        statuses = [status for _, status, *_ in records]
        server_errors = sum(isinstance(s, int) and s >= 500 for s in statuses)
        connection_errors = sum(not isinstance(s, int) for s in statuses)
        wrong = [(kind, s) for _, s, e, kind in records if s != e]
        n_bad = sum(e != 200 for _, _, e, _ in records)
        print(
            f"\nburst: {len(records)} requests from 64 clients in {seconds:.1f} s ({n_bad} bad uploads of "
            f"{len(bad)} kinds, {len(records) - n_bad} good images)"
        )
        for kind, expected in [("good image", 200)] + [(k, e) for _, _, e, k in bad]:
            got = Counter(s for _, s, _, k in records if k == kind)
            answers = ", ".join(f"{n} x {s}" for s, n in sorted(got.items(), key=str))
            print(f"  {kind:<20} expected {expected}: {answers}")
        print(
            f"  5xx server errors: {server_errors}; connection errors: {connection_errors}; "
            f"answers other than expected: {len(wrong)}" + (f" {wrong[:5]}" if wrong else "")
        )
        health = request(port, "GET", "/healthz")[0]
        status, body = request(port, "POST", "/predict", *good[0][:2])
        label = json.loads(body)[0]["label"] if status == 200 else None
        hwm, rss = peak_memory_mb(server.pid)
        print(
            f"  afterwards: /healthz {health}, a good image -> {status} {label!r}; server memory peak "
            f"{hwm:.0f} MB, now {rss:.0f} MB"
        )
        passed = server_errors == 0 and connection_errors == 0 and not wrong and health == 200 and status == 200
        print("burst " + ("PASSED" if passed else "FAILED"))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
