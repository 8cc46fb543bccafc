"""Helpers shared by the test modules (importable because pyproject's pytest `pythonpath` names tests/):
generated images, the real `foldercnn` command in a subprocess, a real `foldercnn serve` on 127.0.0.1, and
where the browser is."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_shape(kind, size, rng):
    """A coloured shape at a random place and scale on a white background."""
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(r + 1, size - r - 1, 2)
    colour = tuple(int(c) for c in rng.integers(0, 180, 3))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im


def make_shapes(root, per_class=24, size=40, seed=0, classes=SHAPES, fmt="png"):
    rng = np.random.default_rng(seed)
    root = Path(root)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, size, rng).save(root / kind / f"{kind}{i}.{fmt}")
    return root


PATTERNS = ("cross", "ring", "bars")
CLUTTER = ("disc", "triangle", "block")  # distractor shapes: never a class's pattern
PALETTE = ((220, 30, 30), (40, 90, 220), (30, 170, 60), (230, 200, 40))


def _draw_pattern(draw, kind, box, colour):
    x0, y0, x1, y1 = box
    w = max(2, (x1 - x0) // 4)
    if kind == "cross":
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - w // 2, y0, cx + w // 2, y1 - 1], fill=colour)
        draw.rectangle([x0, cy - w // 2, x1 - 1, cy + w // 2], fill=colour)
    elif kind == "ring":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=w)
    elif kind == "bars":
        for y in range(y0, y1, 2 * w):
            draw.rectangle([x0, y, x1 - 1, min(y + w, y1) - 1], fill=colour)
    elif kind == "disc":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) // 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=colour)
    else:
        draw.rectangle([x0 + w // 2, y0 + w // 2, x1 - 1 - w // 2, y1 - 1 - w // 2], fill=colour)


def pointing_image(kind, size, rng, distractors=3):
    """A noisy background, one red patch whose pattern is the class, and distractor shapes of the same size in
    the same colours (red among them) at other places: only the patch decides. Returns (image, the patch's box
    x0, y0, x1, y1)."""
    base = rng.integers(90, 170, 3)
    pixels = np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    side = max(8, size // 5)
    boxes = []
    while len(boxes) < distractors + 1:
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        box = (x, y, x + side, y + side)
        if all(x + side <= b[0] or b[2] <= x or y + side <= b[1] or b[3] <= y for b in boxes):
            boxes.append(box)
    _draw_pattern(draw, kind, boxes[0], PALETTE[0])
    for box in boxes[1:]:
        _draw_pattern(draw, CLUTTER[int(rng.integers(len(CLUTTER)))], box, PALETTE[int(rng.integers(len(PALETTE)))])
    return im, boxes[0]


def make_pointing_set(root, per_class=60, size=64, seed=0):
    """A folder of pointing_image()s (one sub-folder per pattern) and {relative path: box} of the red patches."""
    rng = np.random.default_rng(seed)
    root, boxes = Path(root), {}
    for kind in PATTERNS:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im, box = pointing_image(kind, size, rng)
            im.save(root / kind / f"{kind}{i:03d}.png")
            boxes[f"{kind}/{kind}{i:03d}.png"] = box
    return root, boxes


def pointing_hits(maps, boxes, size, tolerance):
    """Whether each map's maximum (upsampled to size x size) lies within `tolerance` pixels of its box."""
    from foldercnn.models.explain import resize_maps

    up = resize_maps(maps, size).numpy()
    hits = []
    for m, (x0, y0, x1, y1) in zip(up, boxes):
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        hits.append(x0 - tolerance <= x < x1 + tolerance and y0 - tolerance <= y < y1 + tolerance)
    return np.array(hits)


def run_cli(*args, env=None, timeout=300):
    """Run the real `foldercnn` command in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "foldercnn.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc, port, log):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def output(self):
        return Path(self.log).read_text()


def start_server(model_path, *options, log, env=None, port=None):
    port = port or free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "foldercnn.cli", "serve", str(model_path), "--port", str(port), *map(str, options)],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    out.close()
    return Server(proc, port, log)


def wait_healthy(server, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}: {server.output()}")
        try:
            if httpx.get(server.url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"server not healthy within {timeout} s: {server.output()}")


def stop(server):
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(timeout=15)


@contextlib.contextmanager
def running_server(model_path, *options, log, env=None):
    """`foldercnn serve` on a free 127.0.0.1 port, healthy, and always stopped afterwards."""
    server = start_server(model_path, *options, log=log, env=env)
    try:
        wait_healthy(server)
        yield server
    finally:
        stop(server)


# found on PATH, exactly as .ci/run looks for it (`command -v chromium`); None when not installed
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def untrained_hand_model(path):
    """A model file of the hand-landmarks architecture with seeded, untrained weights (rock, paper, scissors)."""
    import torch

    from foldercnn.data import hands
    from foldercnn.models.file import save_model
    from foldercnn.models.preprocess import default_preprocessing
    from foldercnn.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("hand-landmarks", num_classes=3)
    meta = {
        "architecture": "hand-landmarks",
        "arch_args": {},
        "classes": ["paper", "rock", "scissors"],
        "image_size": 256,
        "preprocessing": default_preprocessing(fit="letterbox", hands=hands.describe_finder()),
    }
    return save_model(path, model, meta)


def unfamiliar_between(model_path, strange, familiar, out):
    """A copy of an image model file at OUT whose unfamiliarity threshold lies midway (geometrically) between the
    raw scores of the highest-scoring of `strange` and the lowest-scoring of `familiar` (image paths). The copy
    then calls that strange image unfamiliar and that familiar one not, by construction, on every host: a tiny
    model trained in a test scores a black frame 1.4x its threshold on one host and 0.54x on another (bf16
    kernels), so a test of how a score is *shown* fixes the score's threshold instead of the training.
    Returns (out, the strange image, the familiar image)."""
    import math

    import foldercnn
    from test_model_file import _with_meta

    clf = foldercnn.load(model_path)
    threshold = clf.metadata["unfamiliar"]["threshold"]
    raw = lambda path: clf.predict(path).unfamiliarity * threshold  # noqa: E731
    strange = max(strange, key=raw)
    familiar = min(familiar, key=raw)
    high, low = raw(strange), raw(familiar)
    assert high > 1.5 * low, f"the strange image scores {high:.3g}, the familiar one {low:.3g}: no room between"
    change = lambda meta: meta["unfamiliar"].update(threshold=math.sqrt(high * low))  # noqa: E731
    Path(out).write_bytes(_with_meta(Path(model_path).read_bytes(), change))
    return out, strange, familiar


def noise_folder(root, classes, per_class=3, seed=0):
    """ROOT/CLASS/I.png: `per_class` 40 x 40 images of seeded colour noise per class (to scan, not to learn)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (Path(root) / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(Path(root) / cls / f"{i}.png")
    return Path(root)
