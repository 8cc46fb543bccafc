"""Where the model looked: the pointing game per architecture and method, the cost of an explained prediction, the
camera's frame rate with the overlay on, and the share of the map on the subject per model on real folders.

    python benchmarks/explain.py [--parts pointing,cost,camera,subject] [--seed 0]
        [--models fast=RUN/model.safetensors,transfer=...,robust=...,hands=...]
        [--folders ../shared/data/rps/test,../shared/data/rps-photos/green-screen]

pointing: a synthetic set (tests/testkit.make_pointing_set) where the class is the pattern of one small red patch
at a random place among distractor patches of every pattern in other colours; each architecture trains on 150
images per class (fast-cnn and tutorial-cnn from scratch, EfficientNet-Lite0/1/2 as the probe recipe's linear
probe) and is tested on 30 new ones per class: a hit when the maximum of the map (upsampled to the image) lies
within the patch grown by the pointing game's usual tolerance (15 px at 224 px, scaled to the image size); and
for the default method the share of the map's mass on the patch beside the patch's share of the image.

cost: a batch of 16 images, plain predict (predict_arrays) against explained predict (explain_arrays), median
of 7 timed runs each after a warm-up, side by side, for fast-cnn at 64 px and EfficientNet-Lite0 at 224 px.

camera: a real `foldercnn serve` on 127.0.0.1; 30 camera-sized JPEG frames (320 x 240) posted one after
another, as the page sends them, with and without ?explain=1: frames per second (the page itself sends at
most one frame every 300 ms, ~3.3 per second).

subject: foldercnn.evaluate on each folder with each model in --models: accuracy, the share of the map mass
(hands: of the 21 points) on the subject's mask (data/subjects.py: green screen keyed by colour, other plain
backgrounds by their border), on the correct answers and on the mistakes, and the subject's area.
"""

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

import foldercnn
from foldercnn.data.images import decode
from foldercnn.evaluation.looking import map_share
from foldercnn.models.explain import DEFAULT_METHOD, METHODS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from testkit import make_pointing_set, pointing_hits, running_server  # noqa: E402

# name: (recipe, overrides, image size)
ARCHITECTURES = {
    "fast-cnn": ("fast", {"epochs": 15}, 64),
    "tutorial-cnn": ("seed", {"epochs": 10}, 96),
    "effnet-lite0": ("probe", {}, 224),
    "effnet-lite1": ("probe", {"model": "effnet-lite1"}, 224),
    "effnet-lite2": ("probe", {"model": "effnet-lite2"}, 224),
}


def host_line():
    bf16 = sum("avx512_bf16" in line for line in open("/proc/cpuinfo"))
    return f"host: {torch.get_num_threads()} threads, avx512_bf16 {'yes' if bf16 else 'no'}, torch {torch.__version__}"


def pointing_set(base, size, seed):
    make_pointing_set(base / "train", per_class=150, size=size, seed=seed)
    test, boxes = make_pointing_set(base / "test", per_class=30, size=size, seed=seed + 1)
    paths = sorted(boxes)
    return base / "train", np.stack([decode(test / p, size) for p in paths]), [boxes[p] for p in paths], paths


def pointing(work, seed, names):
    print("\n== pointing game: share of test images whose map maximum is on the deciding patch ==")
    print(
        f"{'architecture':<14}{'px':>5}{'train s':>9}{'accuracy':>10}"
        + "".join(f"{m:>12}" for m in METHODS)
        + f"{'mass on patch':>15}{'patch area':>12}"
    )
    models = {}
    for name in names:
        recipe, overrides, size = ARCHITECTURES[name]
        base = work / f"pointing-{name}"
        train, images, boxes, paths = pointing_set(base, size, seed)
        args = {**overrides, "image_size": size}
        start = time.perf_counter()
        result = foldercnn.train(train, base / "run", recipe=recipe, seed=seed, log=lambda *a: None, **args)
        seconds = time.perf_counter() - start
        classifier = foldercnn.load(result.model_path)
        models[name] = classifier
        cells = []
        for method in METHODS:
            predictions, maps = classifier.explain_arrays(images, method=method)
            cells.append(pointing_hits(maps, boxes, size, tolerance=max(1, round(15 * size / 224))).mean())
            if method == DEFAULT_METHOD:
                masks = np.zeros((len(boxes), size, size), np.float32)
                for mask, (x0, y0, x1, y1) in zip(masks, boxes):
                    mask[y0:y1, x0:x1] = 1
                mass, area = np.nanmean(map_share(maps, masks)), masks.mean()
        accuracy = np.mean([p.label == path.split("/")[0] for p, path in zip(predictions, paths)])
        print(
            f"{name:<14}{size:>5}{seconds:>9.0f}{accuracy:>10.1%}"
            + "".join(f"{c:>12.1%}" for c in cells)
            + f"{mass:>15.1%}{area:>12.1%}"
        )
    return models


def median_seconds(function, runs=7):
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(models):
    print("\n== cost: a batch of 16, plain predict vs explained predict (median of 7, side by side) ==")
    rng = np.random.default_rng(0)
    for name in [n for n in ("fast-cnn", "effnet-lite0") if n in models]:
        classifier = models[name]
        batch = rng.integers(0, 256, (16, classifier.image_size, classifier.image_size, 3), dtype=np.uint8)
        plain = median_seconds(lambda c=classifier, b=batch: c.predict_arrays(b))
        explained = median_seconds(lambda c=classifier, b=batch: c.explain_arrays(b))
        print(
            f"{name:<14} {classifier.image_size} px: plain {plain * 1000:.0f} ms, explained {explained * 1000:.0f} ms, "
            f"ratio {explained / plain:.2f}x"
        )


def camera_frames(n=30):
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=85)
        frames.append(buffer.getvalue())
    return frames


def camera(models, work):
    print("\n== camera: frames per second, one frame after another (320 x 240 JPEG) ==")
    frames = camera_frames()
    for name in [n for n in ("fast-cnn", "effnet-lite0") if n in models]:
        path = models[name].path
        with running_server(path, log=work / f"serve-{name}.log") as server, httpx.Client(timeout=60) as client:
            rates = []
            for query in ("", "?explain=1"):
                client.post(server.url + "/predict" + query, files={"files": ("f.jpg", frames[0], "image/jpeg")})
                start = time.perf_counter()
                for frame in frames:
                    answer = client.post(
                        server.url + "/predict" + query, files={"files": ("f.jpg", frame, "image/jpeg")}
                    )
                    answer.raise_for_status()
                rates.append(len(frames) / (time.perf_counter() - start))
        print(f"{name:<14} plain {rates[0]:.1f} frames/s, with the map {rates[1]:.1f} frames/s")


def subject(named_models, folders):
    print("\n== does it look at the subject? (share of the map, hands: of the points, on the subject's mask) ==")
    print(
        f"{'model':<10}{'folder':<16}{'images':>7}{'masked':>7}{'accuracy':>10}{'share':>8}{'correct':>9}"
        f"{'mistakes':>10}{'area':>7}"
    )
    for name, path in named_models.items():
        classifier = foldercnn.load(path)
        for folder in folders:
            ev = foldercnn.evaluate(classifier, folder)
            look = ev.looking or {}
            cell = lambda k, look=look: f"{look[k]:.1%}" if look.get(k) is not None else "-"  # noqa: E731
            print(
                f"{name:<10}{Path(folder).name:<16}{ev.n:>7}{look.get('n', 0):>7}{ev.accuracy:>10.1%}"
                f"{cell('share'):>8}{cell('share_correct'):>9}{cell('share_mistakes'):>10}{cell('subject_area'):>7}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="pointing,cost,camera,subject")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--architectures", default=",".join(ARCHITECTURES), help="for the pointing game")
    parser.add_argument("--models", default="", help="NAME=MODEL_FILE,... for the subject part")
    parser.add_argument(
        "--folders",
        default="../shared/data/rps/test,../shared/data/rps-photos/green-screen",
        help="for the subject part",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    print(host_line())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = (
            pointing(work, args.seed, args.architectures.split(",")) if parts & {"pointing", "cost", "camera"} else {}
        )
        if "cost" in parts:
            cost(models)
        if "camera" in parts:
            camera(models, work)
    if "subject" in parts and args.models:
        named = dict(item.split("=", 1) for item in args.models.split(","))
        subject(named, [f for f in args.folders.split(",") if f])


if __name__ == "__main__":
    main()
