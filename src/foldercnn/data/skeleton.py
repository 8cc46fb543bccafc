"""The 21-point hand skeleton: which points are joined, and a picture of a found hand drawn over its image."""

import numpy as np

# MediaPipe's hand skeleton: (from, to) landmark indices, for drawing
SKELETON = (
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (5, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (9, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (13, 17),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
)


def draw_skeleton(rgb, hand, colour=(34, 197, 94)):
    """A copy of an (H, W, 3) uint8 image with the hand's 21 points and bones drawn on it (for previews)."""
    if hand is None:
        return np.asarray(rgb).copy()
    return draw_points(rgb, hand.points[:, :2], colour)


def draw_points(rgb, points, colour=(34, 197, 94)):
    """A copy of an (H, W, 3) uint8 image with 21 points ((21, 2) x, y as fractions of width and height) and the
    bones between them drawn on it."""
    from PIL import Image, ImageDraw

    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    h, w = rgb.shape[:2]
    xy = [(float(x) * w, float(y) * h) for x, y in np.asarray(points)[:, :2]]
    width = max(1, round(max(h, w) / 100))
    for a, b in SKELETON:
        draw.line([xy[a], xy[b]], fill=colour, width=width)
    for x, y in xy:
        draw.ellipse([x - width, y - width, x + width, y + width], fill=(248, 250, 252), outline=(21, 128, 61))
    return np.asarray(im).copy()
