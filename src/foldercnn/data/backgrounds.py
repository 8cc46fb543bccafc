"""Background randomisation: put the subject of a plain-background photo in front of varied backgrounds.

A model trained on hands in front of a white studio wall learns "white wall" as part of every class, and is lost
in front of a kitchen or a green screen. Where an image's border is plain (one colour, little variation), the
pixels that differ from that colour are the subject; they are composited onto a background drawn from a bank of
real photos (the sample images that ship inside scikit-learn and scikit-image) and procedural textures (smooth
colour noise, gradients, stripes, flat colours). Images with busy borders are left as they are.

Everything works on NCHW float batches in [0, 1] and draws from the caller's torch.Generator, so a seed
repeats it exactly.
"""

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BORDER = 0.06  # the outer 6% of each side is "the border"
PLAIN_NEAR = 0.08  # border pixels within this colour distance (RGB in [0, 1]) of the border's median are "plain"
PLAIN_SHARE = 0.6  # ... and a border is plain when this share of it is (the subject may touch the edge)
SUBJECT_DISTANCE = (0.06, 0.16)  # colour distance from the border's colour: below: background, above: subject
BANK_SIZE = 96
# scikit-image's sample photos that make plausible backgrounds (people, animals, rooms, textures, streets)
SKIMAGE_PHOTOS = (
    "astronaut.png",
    "brick.png",
    "chelsea.png",
    "coffee.png",
    "grass.png",
    "gravel.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "camera.png",
    "page.png",
    "color.png",
    "logo.png",
    "horse.png",
)


def _border_pixels(x):
    """(N, 3, P) the pixels of each image's border frame."""
    n, c, h, w = x.shape
    b = max(1, int(round(BORDER * min(h, w))))
    frame = torch.ones(h, w, dtype=torch.bool, device=x.device)
    frame[b : h - b, b : w - b] = False
    return x[:, :, frame]


def plain_background(x):
    """(N,) bool: which images have a plain border, and (N, 3) the border's median colour."""
    border = _border_pixels(x)
    colour = border.median(dim=2).values
    near = (border - colour[:, :, None]).norm(dim=1) < PLAIN_NEAR
    return near.float().mean(1) >= PLAIN_SHARE, colour


def subject_mask(x, colour):
    """(N, 1, H, W) soft mask, 1 on the subject: pixels far in colour from the border colour, smoothed."""
    dist = (x - colour[:, :, None, None]).norm(dim=1, keepdim=True)
    lo, hi = SUBJECT_DISTANCE
    mask = ((dist - lo) / (hi - lo)).clamp(0, 1)
    k = max(3, (x.shape[-1] // 16) | 1)
    mask = -F.max_pool2d(-F.max_pool2d(mask, k, 1, k // 2), k, 1, k // 2)  # closing: fills holes in the subject
    return F.avg_pool2d(mask, 5, 1, 2, count_include_pad=False)  # feathered edge


def _skimage_data_dir():
    spec = importlib.util.find_spec("skimage")  # located, not imported: importing scikit-image is slow
    return Path(spec.submodule_search_locations[0]) / "data" if spec and spec.submodule_search_locations else None


def _photos():
    """Real photos shipped inside installed packages, as uint8 HxWx3 arrays."""
    from sklearn.datasets import load_sample_images

    photos = list(load_sample_images().images)  # china.jpg, flower.jpg
    folder = _skimage_data_dir()
    for name in SKIMAGE_PHOTOS:
        if folder is not None and (folder / name).is_file():
            with Image.open(folder / name) as im:
                photos.append(np.asarray(im.convert("RGB")))
    return photos


def _random_crop(photo, size, rng):
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    im = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255


def _procedural(size, rng):
    """A smooth colour-noise field, a gradient, stripes or a flat colour."""
    kind = rng.integers(4)
    if kind == 0:
        cells = rng.integers(2, 9)
        noise = rng.random((cells, cells, 3)).astype(np.float32)
        return (
            np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC), np.float32)
            / 255
        )
    if kind == 1:
        a, b = rng.random(3), rng.random(3)
        t = np.linspace(0, 1, size)[:, None, None] * np.ones((1, size, 1))
        img = a * (1 - t) + b * t
        return np.rot90(img, rng.integers(4)).astype(np.float32)
    if kind == 2:
        a, b = rng.random(3), rng.random(3)
        period = rng.integers(4, max(5, size // 3))
        on = (np.arange(size) // period) % 2 == 0
        img = np.where(on[:, None, None], a, b) * np.ones((size, size, 3))
        return np.rot90(img, rng.integers(4)).astype(np.float32)
    return (rng.random(3) * np.ones((size, size, 3))).astype(np.float32)


@lru_cache(maxsize=4)
def background_bank(size, n=BANK_SIZE, seed=0):
    """(n, 3, size, size) float backgrounds: half crops of real photos, half procedural. Built once per size."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    bank = [
        _random_crop(photos[rng.integers(len(photos))], size, rng) if k % 2 == 0 else _procedural(size, rng)
        for k in range(n)
    ]
    return torch.from_numpy(np.stack(bank)).permute(0, 3, 1, 2).contiguous()


def replace_backgrounds(x, probability, generator=None):
    """Composite the subject of each plain-background image onto a random background, with `probability`."""
    if probability <= 0:
        return x
    n, _, h, w = x.shape
    plain, colour = plain_background(x)
    chosen = plain & (torch.rand(n, generator=generator) < probability).to(x.device)
    if not chosen.any():
        return x
    bank = background_bank(max(h, w)).to(x.device, x.dtype)
    pick = torch.randint(len(bank), (n,), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).view(n, 1, 1, 1).to(x.device)
    bg = bank[pick][:, :, :h, :w]
    bg = torch.where(flips, bg.flip(-1), bg)
    mask = subject_mask(x, colour)
    composite = mask * x + (1 - mask) * bg
    return torch.where(chosen.view(n, 1, 1, 1), composite, x)
