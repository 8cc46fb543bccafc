"""The hand finder's cascade: which stages data/hands.py tries, in which order, with which of MediaPipe Hands'
models. Its own module so that the hand cache (hands_cache.py) can check a record's stage without importing the
finder."""

from dataclasses import dataclass

# MediaPipe's lite models: faster than the full ones, and they found more hands in real photos (benchmarks/hands.py);
# the full landmark model only in the last stage, where it finds hands the lite one misses (benchmarks/README.md)
PALM, LANDMARK, LANDMARK_FULL = "palm_detection_lite", "hand_landmark_lite", "hand_landmark_full"
MODELS = (PALM, LANDMARK, LANDMARK_FULL)
LANDMARKS_ONLY = "landmarks only"


@dataclass(frozen=True)
class CascadeStage:
    name: str
    confidence: float = 0.3  # the palm detector's minimum score
    border: float = 0.0  # padding of the mean colour on each side, as a fraction of the longer side
    turns: int = 0  # quarter turns counter-clockwise before detection
    # no palm detector: this landmark model alone on the whole photo, at its four quarter turns
    landmarks_only: str | None = None
    zoom: float = 1.0  # landmarks only: the square it reads, over the photo's longer side (> 1: a margin)


# benchmarks/hand_passes.py measured the order: the palm stages first, then the landmark model alone, beat either
# alone and running both on every photo (docs/hands.md); benchmarks/hands.py measures each stage's share and cost
CASCADE = (
    CascadeStage("image"),
    CascadeStage("border", border=0.3),
    CascadeStage("turned 90", border=0.3, turns=1),
    CascadeStage("turned 270", border=0.3, turns=3),
    CascadeStage("turned 180", border=0.3, turns=2),
    CascadeStage("low confidence", 0.2),
    CascadeStage(LANDMARKS_ONLY, landmarks_only=LANDMARK),
    CascadeStage("landmarks only, full model, with a margin", landmarks_only=LANDMARK_FULL, zoom=1.3),
)
