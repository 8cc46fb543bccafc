"""Pictures of where a model looked: its class activation map as a heat map over the photo (a landmark model:
the hand's skeleton), with the predicted class and probability in the corner."""

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.images import load_rgb
from ..data.skeleton import draw_points

SIDE = 384  # the longest side of a written picture
ALPHA = 0.5  # how much of the heat map shows over the photo


def photo(source, side=SIDE):
    """(H, W, 3) uint8: the image as a person sees it (EXIF orientation applied), its longest side `side`."""
    im = load_rgb(source, draft_size=side)
    scale = side / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def heat_overlay(rgb, one_map, alpha=ALPHA):
    """The photo with an (h, w) map in [0, 1] stretched over all of it (the model saw the whole image,
    squashed square) as a blue-to-red heat map."""
    from matplotlib import colormaps

    h, w = rgb.shape[:2]
    stretched = Image.fromarray(np.asarray(one_map, np.float32), "F").resize((w, h), Image.BILINEAR)
    heat = colormaps["jet"](np.clip(np.asarray(stretched), 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * rgb + alpha * heat, 0, 255).astype(np.uint8)


def caption_text(prediction):
    if prediction.label is None:
        return "no hand found"
    unfamiliar = " - unfamiliar" if prediction.unfamiliar else ""
    return f"{prediction.label} {prediction.probability:.0%}{unfamiliar}"


def with_caption(rgb, text):
    """A copy with `text` on a dark box in the top-left corner."""
    im = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=max(12, im.height // 18))
    left, top, right, bottom = draw.textbbox((6, 4), text, font=font)
    draw.rectangle([0, 0, right + 6, bottom + 6], fill=(15, 23, 42))
    draw.text((6, 4), text, fill=(248, 250, 252), font=font)
    return np.asarray(im).copy()


def unletterbox(points, width, height):
    """Hand points as fractions of the letterboxed square the landmark model saw -> fractions of the photo."""
    side = max(width, height)
    xy = np.asarray(points, np.float64)[:, :2] * side
    return np.stack([(xy[:, 0] - (side - width) / 2) / width, (xy[:, 1] - (side - height) / 2) / height], 1)


def explained_picture(rgb, prediction, one_map=None, caption=True, letterboxed=False):
    """The photo with its explanation: the heat map (image models) or the hand's skeleton (landmark models), and
    the answer in the corner. letterboxed: rgb is the letterboxed square itself, not the photo."""
    if one_map is not None:
        rgb = heat_overlay(rgb, one_map)
    elif prediction.hand and prediction.hand.get("found"):
        points = prediction.hand["points"]
        rgb = draw_points(rgb, points if letterboxed else unletterbox(points, rgb.shape[1], rgb.shape[0]))
    return with_caption(rgb, caption_text(prediction)) if caption else rgb
