"""Does the model look at the subject? The share of its class activation map inside the subject's mask (for a
landmark model: the share of its 21 points), on the images whose background lets the subject be masked.

A share near the subject's own area (what a map spread evenly would get) says the model looks everywhere; a
model that learned the studio instead of the hand puts its map on the background.
"""

import numpy as np

from ..data.subjects import subject_masks
from ..models.explain import resize_maps


def map_share(maps, masks):
    """(N,) share of each map's mass inside its (N, S, S) mask (NaN for an all-zero map)."""
    up = resize_maps(maps, masks.shape[-1]).numpy()
    mass = up.sum((1, 2))
    inside = (up * masks).sum((1, 2))
    return np.where(mass > 0, inside / np.where(mass > 0, mass, 1), np.nan)


def point_share(hands, masks):
    """(N,) share of each found hand's points inside its mask (NaN where no hand was found); hands: FoundHands."""
    out = np.full(len(masks), np.nan)
    size = masks.shape[-1]
    for i in np.flatnonzero(hands.found):
        xy = np.clip((hands.points[i, :, :2] * size).astype(int), 0, size - 1)
        out[i] = float(masks[i][xy[:, 1], xy[:, 0]].mean())
    return out


def _mean(values):
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else None


def looking_summary(images, y_true, y_pred, how="auto", maps=None, hands=None):
    """{"share", "share_correct", "share_mistakes", "subject_area", counts ...} on the images with a subject mask,
    from an image model's maps or a landmark model's hands (FoundHands); None when no image has a mask (busy
    backgrounds, how="off") or there is nothing to measure (an ONNX model: no maps). y_pred: -1 for no answer."""
    if how == "off" or (maps is None and hands is None):
        return None
    masks, found = subject_masks(np.asarray(images), how)
    index = np.flatnonzero(found)
    if not len(index):
        return None
    if hands is not None:
        share = point_share(hands.take(index), masks[index])
    else:
        share = map_share(maps[index], masks[index])
    correct = np.asarray(y_pred)[index] == np.asarray(y_true)[index]
    return {
        "mask": how,
        "measured": "hand points" if hands is not None else "map mass",
        "n": int(len(index)),
        "n_images": int(len(images)),
        "share": _mean(share),
        "share_correct": _mean(share[correct]),
        "share_mistakes": _mean(share[~correct]),
        "n_mistakes": int((~correct).sum()),
        "subject_area": float(masks[index].mean()),
    }
