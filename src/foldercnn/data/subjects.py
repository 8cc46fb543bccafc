"""Where the subject of a photo is, when the background makes it plain: a mask per image, 1 on the subject.

Two ways: a green screen is keyed out by colour (a pixel is background where green clearly leads red and blue);
any other plain background (a studio wall, a CGI render's white) by the background randomiser's detector (the
border's colour, and the pixels far from it). "auto" keys out green when an image's border is green, else uses
the plain-border detector; images with busy backgrounds get no mask.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import OptionError
from .backgrounds import plain_background, subject_mask

HOW = ("auto", "green", "plain", "off")
GREEN_LEAD = 0.06  # green above max(red, blue) by this much (pixels in [0, 1]) is the screen
MIN_SCREEN = 0.1  # an image keyed as green screen must have at least this share of screen pixels


def _unit(images_uint8_nhwc):
    return torch.as_tensor(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float() / 255.0


def green_key(x):
    """(N, 1, H, W) 1 where a pixel is not green screen, the specks closed away."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    subject = ((g - torch.maximum(r, b)) < GREEN_LEAD).float()
    return -F.max_pool2d(-F.max_pool2d(subject, 3, 1, 1), 3, 1, 1)  # opening: lone specks go


def green_border(colour):
    """(N,) whether a border colour (N, 3) in [0, 1] is a green screen's."""
    return colour[:, 1] - torch.maximum(colour[:, 0], colour[:, 2]) > GREEN_LEAD


def subject_masks(images_uint8_nhwc, how="auto", batch_size=64):
    """(N, H, W) float32 masks in [0, 1] (1: subject) and (N,) bool: which images got one; in batches, so a
    folder of photos never stands in memory as floats."""
    if how not in HOW:
        raise OptionError("subject_mask", f"must be one of {', '.join(HOW)}, got {how!r}")
    n, h, w = images_uint8_nhwc.shape[:3]
    masks, found = np.zeros((n, h, w), np.float32), np.zeros(n, bool)
    if how == "off":
        return masks, found
    for start in range(0, n, batch_size):
        part = slice(start, start + batch_size)
        masks[part], found[part] = _masks(_unit(images_uint8_nhwc[part]), how)
    return masks, found


def _masks(x, how):
    plain, colour = plain_background(x)
    key = green_key(x)
    green = torch.ones(len(x), dtype=torch.bool) if how == "green" else green_border(colour) & (how == "auto")
    green &= (1 - key.mean((1, 2, 3))) >= MIN_SCREEN
    masks = torch.where(green[:, None, None, None], key, subject_mask(x, colour))
    return masks[:, 0].numpy(), (green | (plain & (how != "green"))).numpy()
