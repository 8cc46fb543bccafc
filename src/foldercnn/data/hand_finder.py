"""Finding a hand in a photo with MediaPipe Hands' two models, run on onnxruntime: the palm detector finds and
aligns a hand, the landmark model reads its 21 points from a crop turned upright. The decoding around the models
(anchors, non-maximum suppression, the rotated hand box, the crop and its inverse) follows MediaPipe's graphs
(palm_detection_cpu, palm_detection_detection_to_roi, hand_landmark_cpu) step by step, so the points are
MediaPipe's: `benchmarks/hands.py --against-mediapipe` measures how far apart they are.

The ONNX files ship in `hand_models/` (made from the MediaPipe wheel by `scripts/make_hand_models.py`; their
NOTICE names the origin). Rects are in pixels: (centre x, centre y, width, height, rotation in radians)."""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FolderCNNError

MODELS_DIR = Path(__file__).parent / "hand_models"
PALM_SIZE, LANDMARK_SIZE = 192, 224  # the two models' input sides
PRESENCE = 0.5  # MediaPipe's threshold on the landmark model's hand-presence score
NMS_IOU = 0.3
ROI_SCALE, ROI_SHIFT_Y = 2.6, -0.5  # palm box -> hand box (palm_detection_detection_to_roi)
RAW_SCORE_CLIP = 100.0


@dataclass(frozen=True)
class Rect:
    cx: float
    cy: float
    width: float
    height: float
    rotation: float = 0.0


@dataclass(frozen=True)
class Landmarks:
    """What the landmark model read from one crop: `points` (21, 3) x, y as fractions of the image, z relative
    depth (MediaPipe's scale); `world` (21, 3) metres about the hand's centre; `presence` the hand-presence score;
    `right` MediaPipe's handedness."""

    points: np.ndarray
    world: np.ndarray
    presence: float
    right: bool
    handedness: float


def ssd_anchors() -> np.ndarray:
    """(2016, 2) anchor centres of the palm detector, as fractions: SsdAnchorsCalculator with strides 8, 16, 16,
    16 and two anchors per cell per layer (fixed size, so only the centres matter)."""
    centres = []
    for stride, per_cell in ((8, 2), (16, 6)):  # the three stride-16 layers share one grid: 3 x 2 anchors a cell
        n = PALM_SIZE // stride
        y, x = np.meshgrid((np.arange(n) + 0.5) / n, (np.arange(n) + 0.5) / n, indexing="ij")
        cells = np.stack([x.ravel(), y.ravel()], 1)
        centres.append(np.repeat(cells, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


ANCHORS = ssd_anchors()


def warp(rgb: np.ndarray, rect: Rect, size: int, replicate: bool) -> np.ndarray:
    """The (size, size, 3) float32 crop in [0, 1] of `rect`, as OpenCV's warpPerspective samples it in
    MediaPipe's ImageToTensor: bilinear, pixel centres at integer coordinates, the border zero or replicated."""
    h, w = rgb.shape[:2]
    u = np.arange(size, dtype=np.float32) / size - 0.5
    c, s = math.cos(rect.rotation), math.sin(rect.rotation)
    dx, dy = u[None, :] * np.float32(rect.width), u[:, None] * np.float32(rect.height)
    x = np.float32(rect.cx) + np.float32(c) * dx - np.float32(s) * dy
    y = np.float32(rect.cy) + np.float32(s) * dx + np.float32(c) * dy
    if replicate:  # a tap beyond the edge reads the edge: the same as clamping the position
        x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = x - x0, y - y0
    x0, y0 = x0.astype(np.intp), y0.astype(np.intp)
    taps = []
    for yy, xx, weight in (
        (y0, x0, (1 - fx) * (1 - fy)),
        (y0, x0 + 1, fx * (1 - fy)),
        (y0 + 1, x0, (1 - fx) * fy),
        (y0 + 1, x0 + 1, fx * fy),
    ):
        if not replicate:  # zero border: a tap outside the image weighs nothing
            weight = weight * ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))
        taps.append((np.clip(yy, 0, h - 1) * w + np.clip(xx, 0, w - 1), weight * np.float32(1 / 255)))
    planes = np.ascontiguousarray(rgb.reshape(-1, 3).T)
    out = np.empty((size, size, 3), np.float32)
    for ch in range(3):
        out[..., ch] = sum(np.take(planes[ch], index) * weight for index, weight in taps)
    return out


def square_rect(h: int, w: int, rotation: float = 0.0) -> Rect:
    """The whole image padded to a square (MediaPipe's keep_aspect_ratio letterbox), turned by `rotation`."""
    side = float(max(h, w))
    return Rect(w / 2, h / 2, side, side, rotation)


def decode_palms(boxes: np.ndarray, scores: np.ndarray, min_score: float) -> list[tuple[float, np.ndarray]]:
    """(score, (9, 2) fractional [box min, box max, 7 keypoints]) per palm above `min_score`, after MediaPipe's
    weighted non-maximum suppression; best first. Coordinates are fractions of the square detector input."""
    score = 1 / (1 + np.exp(-np.clip(scores.reshape(-1), -RAW_SCORE_CLIP, RAW_SCORE_CLIP)))
    keep = np.flatnonzero(score >= min_score)
    if keep.size == 0:
        return []
    raw = boxes.reshape(-1, 18)[keep] / PALM_SIZE
    centre = ANCHORS[keep]
    box_centre, box_size = raw[:, 0:2] + centre, raw[:, 2:4]
    keypoints = raw[:, 4:].reshape(-1, 7, 2) + centre[:, None, :]
    geometry = np.concatenate(
        [(box_centre - box_size / 2)[:, None], (box_centre + box_size / 2)[:, None], keypoints], 1
    )
    return weighted_nms(score[keep], geometry)


def weighted_nms(score: np.ndarray, geometry: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """MediaPipe's WEIGHTED suppression: each kept palm is the score-weighted mean of those overlapping it by
    IoU > NMS_IOU (itself included), with the best one's score."""
    order = list(np.argsort(-score, kind="stable"))
    out = []
    while order:
        best = order[0]
        overlaps = [i for i in order if iou(geometry[best, :2], geometry[i, :2]) > NMS_IOU]
        weights = score[overlaps][:, None, None]
        out.append((float(score[best]), (geometry[overlaps] * weights).sum(0) / weights.sum()))
        order = [i for i in order if i not in overlaps]
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes given as [[xmin, ymin], [xmax, ymax]]."""
    lo, hi = np.maximum(a[0], b[0]), np.minimum(a[1], b[1])
    inter = float(np.prod(np.clip(hi - lo, 0, None)))
    union = float(np.prod(a[1] - a[0]) + np.prod(b[1] - b[0])) - inter
    return inter / union if union > 0 else 0.0


def hand_rect(palm: np.ndarray, h: int, w: int) -> Rect:
    """The landmark model's crop for one palm (fractions of the image): the box turned so that wrist -> middle
    knuckle points up, shifted half a box towards the fingers, made square on its long side, scaled 2.6x."""
    (x0, y0), (x1, y1) = palm[0], palm[1]
    cx, cy, bw, bh = (x0 + x1) / 2 * w, (y0 + y1) / 2 * h, (x1 - x0) * w, (y1 - y0) * h
    wrist, knuckle = palm[2] * (w, h), palm[4] * (w, h)
    angle = math.pi / 2 - math.atan2(-(knuckle[1] - wrist[1]), knuckle[0] - wrist[0])
    rotation = angle - 2 * math.pi * math.floor((angle + math.pi) / (2 * math.pi))
    c, s = math.cos(rotation), math.sin(rotation)
    cx, cy = cx - bh * ROI_SHIFT_Y * s, cy + bh * ROI_SHIFT_Y * c
    side = max(bw, bh) * ROI_SCALE
    return Rect(cx, cy, side, side, rotation)


class Models:
    """The palm detector's and the landmark models' ONNX sessions, each loaded once (a few tens of ms) when first
    used; one call at a time per instance. `landmark` is the default landmark model; others load on demand."""

    def __init__(self, palm: str = "palm_detection_lite", landmark: str = "hand_landmark_lite", threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FolderCNNError("finding hands needs onnxruntime: pip install 'foldercnn[hands]'") from None
        self.options = ort.SessionOptions()
        self.options.intra_op_num_threads = threads
        self.options.inter_op_num_threads = 1
        self.options.log_severity_level = 3
        self.sessions: dict = {}
        self.palm, self.landmark = self.session(palm), self.session(landmark)

    def session(self, name: str):
        if name not in self.sessions:
            import onnxruntime as ort

            path = MODELS_DIR / f"{name}.onnx"
            if not path.is_file():
                raise FolderCNNError(f"the hand model {path} is missing: reinstall foldercnn")
            self.sessions[name] = ort.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])
        return self.sessions[name]

    def palms(self, rgb: np.ndarray, min_score: float) -> list[tuple[float, Rect]]:
        """(score, hand crop) for each palm found in the image, best first."""
        h, w = rgb.shape[:2]
        rect = square_rect(h, w)
        x = warp(rgb, rect, PALM_SIZE, replicate=False)[None]
        boxes, scores = self.palm.run(None, {"input": x})
        pad_x, pad_y = (1 - w / rect.width) / 2, (1 - h / rect.height) / 2  # the letterbox, per side
        found = []
        for score, g in decode_palms(boxes, scores, min_score):
            g = (g - (pad_x, pad_y)) / (1 - 2 * pad_x, 1 - 2 * pad_y)
            found.append((score, hand_rect(g, h, w)))
        return found

    def landmarks(self, rgb: np.ndarray, rect: Rect, model: str | None = None) -> Landmarks:
        """A landmark model (the default one unless named) on one crop; points projected back to fractions of the
        image."""
        h, w = rgb.shape[:2]
        x = warp(rgb, rect, LANDMARK_SIZE, replicate=True)[None]
        session = self.landmark if model is None else self.session(model)
        raw, presence, handed, world = session.run(None, {"input": x})
        p = raw.reshape(21, 3) / LANDMARK_SIZE
        c, s = math.cos(rect.rotation), math.sin(rect.rotation)
        px, py = p[:, 0] - 0.5, p[:, 1] - 0.5
        points = np.stack(
            [
                ((c * px - s * py) * rect.width + rect.cx) / w,
                ((s * px + c * py) * rect.height + rect.cy) / h,
                p[:, 2] / 0.4 * rect.width / w,  # MediaPipe's normalize_z, then z scaled as x
            ],
            1,
        ).astype(np.float32)
        wl = world.reshape(21, 3)
        world_turned = np.stack([c * wl[:, 0] - s * wl[:, 1], s * wl[:, 0] + c * wl[:, 1], wl[:, 2]], 1)
        left = float(handed.reshape(-1)[0])  # the model's score for "Left" (handedness.txt: Left, Right)
        presence_score = float(presence.reshape(-1)[0])
        return Landmarks(points, world_turned.astype(np.float32), presence_score, left < 0.5, max(left, 1 - left))
