"""Hostile clients against `foldercnn serve`: slow uploads, one huge 16-bit PNG, a model file that asks for 1024 px.

    python benchmarks/hostile.py [--slow 4] [--workers 1]

Everything runs on 127.0.0.1 against real `foldercnn serve` subprocesses, bounded in count and time.
1. Slow clients: --slow connections each send the headers and 100 bytes of a 200 KB upload, then one byte every
   2 s; meanwhile normal clients send one small image at a time. Printed: how the slow ones were answered and
   after how long, how many normal requests were answered and their latency.
2. A 155 KB PNG of 8944 x 8944 16-bit grey pixels, posted once, then twice at once: the server's peak RSS
   (VmHWM) before and after.
3. A valid fast-cnn model file with image_size 1024, sent 16 images of 1 x 1 pixel: the peak RSS.
"""

import argparse
import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from testkit import Server, free_port, make_shapes, stop, wait_healthy  # noqa: E402


def start(model, *options, log):
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.cli", "serve", str(model), "--port", str(port), *map(str, options)],
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    out.close()
    server = Server(proc, port, log)
    wait_healthy(server)
    return server


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def multipart(data, name="x.png", boundary="b0undary"):
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


def slow_client(port, results, size=200_000, every=2.0, limit=40.0):
    """Headers and 100 bytes, then a byte every `every` s, until the server answers or `limit` s pass."""
    body, boundary = multipart(b"\x89PNG" + b"\0" * size)
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(
            (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body[:100]
        )
        s.settimeout(every)
        sent = 100
        while time.perf_counter() - t < limit:
            try:
                answer = s.recv(200)
                if answer:
                    results.append((answer.split(b"\r\n")[0].decode(), time.perf_counter() - t))
                    return
            except socket.timeout:
                pass
            try:
                s.sendall(body[sent : sent + 1])
                sent += 1
            except OSError:
                break
    results.append(("no answer", time.perf_counter() - t))


def slow_clients(model, image, n_slow, workers, log):
    server = start(model, "--workers", workers, log=log)
    try:
        slow, normal = [], []
        threads = [threading.Thread(target=slow_client, args=(server.port, slow)) for _ in range(n_slow)]
        for th in threads:
            th.start()
        time.sleep(1.0)
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline and any(th.is_alive() for th in threads):
            t = time.perf_counter()
            try:
                r = httpx.post(server.url + "/predict", files=[("files", ("a.png", image, "image/png"))], timeout=30)
                normal.append((r.status_code, time.perf_counter() - t))
            except httpx.HTTPError:
                normal.append(("no answer", time.perf_counter() - t))
            time.sleep(0.5)
        for th in threads:
            th.join()
        return slow, normal
    finally:
        stop(server)


def big_png_rss(model, log):
    big = png_bytes(Image.fromarray(np.zeros((8944, 8944), np.uint16)))
    server = start(model, "--max-upload-mb", 1, log=log)
    try:
        before = peak_rss_mb(server.proc.pid)
        r = httpx.post(server.url + "/predict", files=[("files", ("big.png", big, "image/png"))], timeout=120)
        one = peak_rss_mb(server.proc.pid)
        answers = []
        threads = [
            threading.Thread(
                target=lambda: answers.append(
                    httpx.post(
                        server.url + "/predict", files=[("files", ("big.png", big, "image/png"))], timeout=120
                    ).status_code
                )
            )
            for _ in range(2)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return len(big), r.status_code, answers, before, one, peak_rss_mb(server.proc.pid)
    finally:
        stop(server)


def big_model_rss(work, log):
    import torch

    from foldercnn.models.file import save_model
    from foldercnn.models.preprocess import default_preprocessing
    from foldercnn.models.registry import create_model

    torch.manual_seed(0)
    meta = {
        "architecture": "fast-cnn",
        "arch_args": {},
        "classes": ["a", "b", "c"],
        "image_size": 1024,
        "preprocessing": default_preprocessing((0.5,) * 3, (0.25,) * 3),
    }
    path = save_model(work / "big.safetensors", create_model("fast-cnn", 3), meta)
    tiny = png_bytes(Image.new("RGB", (1, 1), "red"))
    server = start(path, log=log)
    try:
        before = peak_rss_mb(server.proc.pid)
        r = httpx.post(
            server.url + "/predict", files=[("files", (f"{i}.png", tiny, "image/png")) for i in range(16)], timeout=300
        )
        return r.status_code, before, peak_rss_mb(server.proc.pid)
    finally:
        stop(server)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slow", type=int, default=4, help="slow clients (at least 2 x workers to fill every slot)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    import foldercnn

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = make_shapes(work / "shapes", per_class=20, size=40)
        model = foldercnn.train(train, work / "run", epochs=2, image_size=32, log=lambda *a: None).model_path
        image = png_bytes(Image.open(sorted(train.rglob("*.png"))[0]))

        slow, normal = slow_clients(model, image, args.slow, args.workers, work / "slow.log")
        print(f"1. {args.slow} slow clients against {args.workers} worker(s) ({2 * args.workers} upload slots):")
        for status, seconds in slow:
            print(f"   slow client: {status} after {seconds:.1f} s")
        ok = [s for code, s in normal if code == 200]
        print(
            f"   normal requests meanwhile: {len(ok)} of {len(normal)} answered 200; latency median "
            f"{np.median(ok) if ok else float('nan'):.2f} s, max {max(ok) if ok else float('nan'):.2f} s"
        )

        size, status, answers, before, one, two = big_png_rss(model, work / "png.log")
        print(
            f"2. a {size / 1024:.0f} KB PNG of 8944 x 8944 16-bit grey: answered {status}; server peak RSS "
            f"{before:.0f} MB -> {one:.0f} MB after one, {two:.0f} MB after two at once (answered {answers})"
        )

        status, before, after = big_model_rss(work, work / "model.log")
        print(
            f"3. a fast-cnn model file with image_size 1024, 16 images of 1 x 1 px: answered {status}; server "
            f"peak RSS {before:.0f} MB -> {after:.0f} MB"
        )


if __name__ == "__main__":
    main()
