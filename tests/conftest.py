"""Shared fixtures: small generated image folders (the suite never needs ../shared)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the decode cache (and downloads) of the whole run, subprocesses included, in a temp folder."""
    os.environ["FOLDERCNN_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


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


@pytest.fixture(scope="session")
def shapes_dirs(tmp_path_factory):
    """(train, test) folders of circles, squares and triangles."""
    base = tmp_path_factory.mktemp("shapes")
    return make_shapes(base / "train", per_class=40, seed=1), make_shapes(base / "test", per_class=15, seed=2)


@pytest.fixture(scope="session")
def trained_model(shapes_dirs, tmp_path_factory):
    """A fast-recipe model trained for a few epochs on the shapes (shared by several tests)."""
    import foldercnn
    out = tmp_path_factory.mktemp("run")
    result = foldercnn.train(shapes_dirs[0], out, recipe="fast", epochs=8, image_size=32, seed=0,
                             log=lambda *a: None)
    return result


def run_cli(*args, env=None, timeout=300):
    """Run the real `foldercnn` command in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "foldercnn.cli", *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright. Skipped (with the reason) where it is not installed,
    except under CI, whose .ci/run installs it: there a missing browser is a failure."""
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; .ci/run should have installed Debian's chromium")
        pytest.skip(f"browser tests need {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        yield b
        b.close()
