"""Finding a hand in a photo: MediaPipe Hands' palm detector and 21-point landmark model (both trained on real
hands, run on onnxruntime by hand_finder.py), with a cascade of retries for tight, rotated and small crops.

The landmark model reads a hand best from a crop the palm detector has found and turned upright, so the first
stages change what the detector sees: a border around a tight crop, a quarter turn, a lower confidence. When the
photo *is* the hand (a tight crop) the detector often sees no palm at all; the last two stages then run a landmark
model alone on the whole photo at its four quarter turns (the lite one, then the full one with a margin) and keep
the turn it is surest holds a hand.
Points always come back in the original image's coordinates.
"""

import math
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import FolderCNNError
from .hand_cascade import CASCADE, LANDMARKS_ONLY, MODELS, CascadeStage  # noqa: F401 (imported from here too)
from .hand_finder import PRESENCE, Models, Rect
from .hands_cache import CACHE_VERSION, POINTS, HandCache, _from_record, _record, image_key
from .skeleton import SKELETON, draw_skeleton  # noqa: F401 (moved there; imported from here too)

INSTALL_HINT = "pip install 'foldercnn[hands]'"
MAX_SIDE = 640  # longer photos are shrunk first: the detector sees 192 px, the landmark model 224 px


@dataclass(frozen=True)
class Hand:
    """One hand: `points` (21, 3) are x, y as fractions of the image's width and height and MediaPipe's relative
    depth z; `world` (21, 3) the same joints in metres about the hand's centre (rotation and scale of the photo
    do not change them); `right` MediaPipe's handedness; `score` the landmark model's hand-presence score;
    `stage` the cascade stage that found it."""

    points: np.ndarray
    world: np.ndarray
    right: bool
    score: float
    stage: str

    def to_dict(self):
        return {
            "found": True,
            "points": np.round(self.points[:, :2], 4).tolist(),
            "handedness": "right" if self.right else "left",
            "score": round(float(self.score), 4),
            "stage": self.stage,
        }


def describe_finder():
    """What the model file records about how its hands are found."""
    return {
        "finder": "MediaPipe Hands models on onnxruntime (foldercnn hand_finder)",
        "models": list(MODELS),
        "cascade": [s.name for s in CASCADE],
        "version": CACHE_VERSION,
    }


def available():
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def require():
    """Import onnxruntime, or say how to install it."""
    if not available():
        raise FolderCNNError(f"the hands recipe needs onnxruntime: {INSTALL_HINT}")


class HandFinder:
    """The cascade over MediaPipe's two models; thread-safe (one call at a time)."""

    def __init__(self, cascade=CASCADE, models=MODELS):
        require()
        self.cascade = tuple(cascade)
        self.models = Models(*models[:2])
        self._lock = threading.Lock()

    def find(self, rgb):
        """The first hand the cascade finds in an (H, W, 3) uint8 RGB array, or None."""
        rgb = shrink(np.ascontiguousarray(rgb, dtype=np.uint8))
        if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 1:
            return None
        with self._lock:
            for stage in self.cascade:
                hand = self._try(rgb, stage)
                if hand is not None:
                    return hand
        return None

    def _try(self, rgb, stage):
        if stage.landmarks_only:
            return self.landmarks_only(rgb, stage)
        image, back = transformed(rgb, stage)
        palms = self.models.palms(image, stage.confidence)
        if not palms:
            return None
        marks = self.models.landmarks(image, palms[0][1])
        if marks.presence < PRESENCE:
            return None
        points = marks.points.copy()
        points[:, :2] = back(points[:, :2])
        return Hand(points, turned_back(marks.world, stage.turns), marks.right, marks.presence, stage.name)

    def landmarks_only(self, rgb, stage):
        """A landmark model alone on the whole photo at each quarter turn; the surest turn, if it holds a hand."""
        h, w = rgb.shape[:2]
        side = max(h, w) * stage.zoom
        best = max(
            (
                self.models.landmarks(rgb, Rect(w / 2, h / 2, side, side, k * math.pi / 2), stage.landmarks_only)
                for k in range(4)
            ),
            key=lambda m: m.presence,
        )
        if best.presence < PRESENCE:
            return None
        return Hand(best.points, best.world, best.right, best.presence, stage.name)

    def close(self):
        pass


def turned_back(world, turns):
    """World points of a hand found in an image turned `turns` quarter turns counter-clockwise, in the original
    image's orientation (x right, y down): each undone quarter turn maps (x, y) -> (-y, x)."""
    world = world.copy()
    for _ in range(turns % 4):
        world[:, 0], world[:, 1] = -world[:, 1].copy(), world[:, 0].copy()
    return world


def shrink(rgb, max_side=MAX_SIDE):
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    from PIL import Image

    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR))


def transformed(rgb, stage):
    """(the image the detector sees for `stage`, a function taking its (N, 2) fractional x, y back to `rgb`'s)."""
    h, w = rgb.shape[:2]
    image, pad = rgb, 0
    if stage.border:
        pad = int(round(stage.border * max(h, w)))
        mean = rgb.reshape(-1, 3).mean(0).astype(np.uint8)
        image = np.empty((h + 2 * pad, w + 2 * pad, 3), np.uint8)
        image[:] = mean
        image[pad : pad + h, pad : pad + w] = rgb
    ph, pw = image.shape[:2]
    if stage.turns:
        image = np.ascontiguousarray(np.rot90(image, stage.turns))

    def back(xy):
        x, y = xy[:, 0].copy(), xy[:, 1].copy()
        for _ in range(stage.turns % 4):  # undo one counter-clockwise quarter turn: (x, y) -> (1 - y, x)
            x, y = 1 - y, x
        return np.stack([(x * pw - pad) / w, (y * ph - pad) / h], axis=1)

    return image, back


_FINDER = None
_FINDER_LOCK = threading.Lock()


def shared_finder():
    """One HandFinder per process (its sessions take a few tens of ms to load)."""
    global _FINDER
    with _FINDER_LOCK:
        if _FINDER is None:
            _FINDER = HandFinder()
        return _FINDER


@dataclass
class FoundHands:
    """The hands of many images, as arrays (rows of images without a hand are zeros, `stage` -1)."""

    points: np.ndarray  # (N, 21, 3) float32
    world: np.ndarray  # (N, 21, 3) float32
    right: np.ndarray  # (N,) bool
    score: np.ndarray  # (N,) float32
    stage: np.ndarray  # (N,) int8: index into the cascade, -1: no hand

    @property
    def found(self):
        return self.stage >= 0

    @classmethod
    def empty(cls, n):
        return cls(
            np.zeros((n, POINTS, 3), np.float32),
            np.zeros((n, POINTS, 3), np.float32),
            np.zeros(n, bool),
            np.zeros(n, np.float32),
            np.full(n, -1, np.int8),
        )

    def put(self, i, hand, cascade=CASCADE):
        if hand is not None:
            self.points[i], self.world[i] = hand.points, hand.world
            self.right[i], self.score[i] = hand.right, hand.score
            self.stage[i] = [s.name for s in cascade].index(hand.stage)

    def take(self, index):
        return FoundHands(*(a[index] for a in (self.points, self.world, self.right, self.score, self.stage)))

    def hand(self, i, cascade=CASCADE):
        if self.stage[i] < 0:
            return None
        return Hand(
            self.points[i], self.world[i], bool(self.right[i]), float(self.score[i]), cascade[self.stage[i]].name
        )

    def arrays(self):
        return {
            "points": self.points,
            "world": self.world,
            "right": self.right,
            "score": self.score,
            "stage": self.stage,
        }


def _fresh_finder():
    global _FINDER
    _FINDER = None  # a forked child loads its own sessions


def _find_one(rgb):
    return shared_finder().find(rgb)


def find_hands(images, workers=None, cache=None, desc="finding hands", pool_from=32):
    """FoundHands of (N, H, W, 3) uint8 images (a tensor or an array), through the content-keyed cache; when at
    least `pool_from` images were not seen before, they are searched in `workers` forked processes.

    A process that has loaded the finder itself never forks again (a child must not inherit a runtime's threads
    or sessions), so such a process searches in-process from then on."""
    from tqdm import tqdm

    cache = HandCache() if cache is None else cache
    n = len(images)
    found, todo = FoundHands.empty(n), []
    keys = [image_key(np.asarray(images[i])) for i in range(n)]
    for i, key in enumerate(keys):
        r = cache.get(key)
        if r is None:
            todo.append(i)
        else:
            _from_record(found, i, r)
    if not todo:
        return found
    workers = min(workers or os.cpu_count() or 1, 4)
    pool = None
    if len(todo) >= pool_from and _FINDER is None and hasattr(os, "fork"):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_fresh_finder)
        results = pool.map(_find_one, (np.asarray(images[i]) for i in todo), chunksize=8)
    else:
        results = (_find_one(np.asarray(images[i])) for i in todo)
    try:
        for i, hand in zip(
            todo,
            tqdm(
                results, total=len(todo), desc=desc, unit="img", leave=False, disable=None if len(todo) >= 32 else True
            ),
            strict=False,
        ):
            found.put(i, hand)
            cache.put(keys[i], _record(found, i))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return found


def hands_of(data, log=print, chunk=1024):
    """FoundHands of DecodedImages, read chunk by chunk (a memory-mapped set is never copied whole)."""
    parts = [find_hands(np.asarray(data.take(slice(k, k + chunk)))) for k in range(0, len(data), chunk)]
    if not parts:
        return FoundHands.empty(0)
    return FoundHands(*(np.concatenate(a) for a in zip(*(p.arrays().values() for p in parts), strict=False)))
