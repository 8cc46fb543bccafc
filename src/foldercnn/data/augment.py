"""Random geometric augmentation of whole batches, as tensors.

Semantics follow Keras' ImageDataGenerator so the `seed` recipe matches the tutorial:
  rotation     degrees, uniform in [-r, r]
  width_shift  fraction of the width, uniform in [-w, w] (height_shift likewise)
  shear        DEGREES, uniform in [-s, s]: Keras passes shear_range to its affine transform as
               degrees, so the tutorial's shear_range=0.2 is a 0.2 degree shear (barely visible)
  zoom         x and y scale drawn independently from [1 - z, 1 + z]; > 1 shows more (zooms out)
  horizontal_flip  with probability 1/2
  fill         "nearest": pixels outside the source repeat the edge (border padding)
  brightness, contrast, saturation (not in the tutorial): per-image factors in [1 - b, 1 + b]
Capture augmentation (the `robust` recipe: photos from other cameras, rooms and light), each with its probability
or bound, applied after the geometry in this order:
  backgrounds  probability of compositing a plain-background image's subject onto another background (backgrounds.py)
  colour_cast  per-channel gains in [1 - c, 1 + c] (white balance, coloured light)
  grey         probability of a grey-scale image
  low_res      probability of shrinking to 25-60% of the side and back (low-resolution crops, blur)
  noise        per-image Gaussian noise, standard deviation uniform in [0, noise]
  jpeg         probability of a JPEG re-compression at a quality uniform in 20-80 (PIL, on the CPU: the
               one capture effect that is not a tensor operation)
The transform maps output pixel coordinates to input ones, like Keras/scipy, and samples bilinearly.
"""

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    shear: float = 0.0
    zoom: float = 0.0
    horizontal_flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    backgrounds: float = 0.0
    colour_cast: float = 0.0
    grey: float = 0.0
    low_res: float = 0.0
    noise: float = 0.0
    jpeg: float = 0.0

    def is_identity(self):
        return not self.horizontal_flip and not any(
            (
                self.rotation,
                self.width_shift,
                self.height_shift,
                self.shear,
                self.zoom,
                self.brightness,
                self.contrast,
                self.saturation,
                self.backgrounds,
                self.colour_cast,
                self.grey,
                self.low_res,
                self.noise,
                self.jpeg,
            )
        )

    def to_dict(self):
        return asdict(self)


def hflip(x):
    """Mirror NCHW images left-right."""
    return x.flip(-1)


def _uniform(n, bound, generator):
    return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def random_affine_matrices(n, cfg: AugmentConfig, generator=None):
    """(n, 2, 3) matrices in grid_sample's normalized (x, y) coordinates, output -> input."""
    theta = torch.deg2rad(_uniform(n, cfg.rotation, generator))
    tx = _uniform(n, cfg.width_shift, generator) * 2  # fraction of width -> normalized units ([-1, 1] spans 2)
    ty = _uniform(n, cfg.height_shift, generator) * 2
    shear = torch.deg2rad(_uniform(n, cfg.shear, generator))
    zx = 1 + _uniform(n, cfg.zoom, generator)
    zy = 1 + _uniform(n, cfg.zoom, generator)
    flip = torch.ones(n, dtype=torch.float64)
    if cfg.horizontal_flip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).double()
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Keras composes rotation @ shift @ shear @ zoom in (row, col) order; written here in (x, y) order,
    # then a horizontal flip of the output (x -> -x) applied last, as Keras flips after transforming.
    zero, one = torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
    rot = torch.stack(
        [torch.stack([cos, sin, zero], -1), torch.stack([-sin, cos, zero], -1), torch.stack([zero, zero, one], -1)], -2
    )
    shift = torch.stack(
        [torch.stack([one, zero, tx], -1), torch.stack([zero, one, ty], -1), torch.stack([zero, zero, one], -1)], -2
    )
    shr = torch.stack(
        [
            torch.stack([torch.cos(shear), zero, zero], -1),
            torch.stack([-torch.sin(shear), one, zero], -1),
            torch.stack([zero, zero, one], -1),
        ],
        -2,
    )
    zoom = torch.stack(
        [torch.stack([zx, zero, zero], -1), torch.stack([zero, zy, zero], -1), torch.stack([zero, zero, one], -1)], -2
    )
    flip_m = torch.diag_embed(torch.stack([flip, one, one], -1))
    m = rot @ shift @ shr @ zoom @ flip_m
    return m[:, :2, :].float()


def apply_affine(x, matrices):
    """Warp NCHW float images by (n, 2, 3) matrices, edge pixels repeated outside the source."""
    grid = F.affine_grid(matrices.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def jitter_colour(x, cfg: AugmentConfig, generator=None):
    """Per-image brightness, contrast and saturation factors on NCHW images in [0, 1]."""
    n = x.shape[0]

    def factors(bound):
        return (1 + _uniform(n, bound, generator)).float().view(n, 1, 1, 1).to(x.device)

    if cfg.saturation:
        grey = x.mean(1, keepdim=True)
        x = grey + (x - grey) * factors(cfg.saturation)
    if cfg.contrast:
        mean = x.mean((1, 2, 3), keepdim=True)
        x = mean + (x - mean) * factors(cfg.contrast)
    if cfg.brightness:
        x = x * factors(cfg.brightness)
    return x.clamp(0, 1)


def _chosen(n, probability, generator, device):
    return (torch.rand(n, generator=generator) < probability).view(n, 1, 1, 1).to(device)


def capture_batch(x, cfg: AugmentConfig, generator=None):
    """Colour cast, grey-scale, low resolution and sensor noise on NCHW images in [0, 1] (see the module doc)."""
    n = x.shape[0]
    if cfg.colour_cast:
        x = x * (1 + _uniform(n * 3, cfg.colour_cast, generator)).float().view(n, 3, 1, 1).to(x.device)
    if cfg.grey:
        grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        x = torch.where(_chosen(n, cfg.grey, generator, x.device), grey.expand_as(x), x)
    if cfg.low_res:
        h, w = x.shape[-2:]
        scale = float(torch.empty(1).uniform_(0.25, 0.6, generator=generator))
        small = F.interpolate(x, size=(max(4, int(h * scale)), max(4, int(w * scale))), mode="area")
        blurred = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        x = torch.where(_chosen(n, cfg.low_res, generator, x.device), blurred, x)
    if cfg.noise:
        sigma = (torch.rand(n, generator=generator) * cfg.noise).view(n, 1, 1, 1).to(x.device)
        x = x + sigma * torch.randn(x.shape, generator=generator).to(x.device)
    x = x.clamp(0, 1)
    if cfg.jpeg:
        x = jpeg_recompress(x, cfg.jpeg, generator)
    return x


def jpeg_recompress(x, probability, generator=None, qualities=(20, 80)):
    """Each NCHW image in [0, 1], with the probability, saved as a JPEG at a random quality and read back."""
    chosen = (torch.rand(len(x), generator=generator) < probability).tolist()
    quality = torch.randint(qualities[0], qualities[1] + 1, (len(x),), generator=generator).tolist()
    if not any(chosen):
        return x
    out = x.clone()
    pixels = (x.detach() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in (i for i, c in enumerate(chosen) if c):
        buffer = io.BytesIO()
        Image.fromarray(pixels[i]).save(buffer, format="JPEG", quality=quality[i])
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
        out[i] = torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(x.device, x.dtype) / 255
    return out


def augment_batch(x, cfg: AugmentConfig, generator=None):
    """Randomly augment a NCHW float batch in [0, 1]; identity config returns x unchanged."""
    if cfg.is_identity():
        return x
    if cfg.backgrounds:  # before the geometry: the border must still be the photo's border
        from .backgrounds import replace_backgrounds

        x = replace_backgrounds(x, cfg.backgrounds, generator)
    geometric = any((cfg.rotation, cfg.width_shift, cfg.height_shift, cfg.shear, cfg.zoom))
    if geometric:
        x = apply_affine(x, random_affine_matrices(x.shape[0], cfg, generator).to(x.device))
    elif cfg.horizontal_flip:  # flips only: no resampling needed
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), hflip(x), x)
    if cfg.brightness or cfg.contrast or cfg.saturation:
        x = jitter_colour(x, cfg, generator)
    if cfg.colour_cast or cfg.grey or cfg.low_res or cfg.noise or cfg.jpeg:
        x = capture_batch(x, cfg, generator)
    return x
