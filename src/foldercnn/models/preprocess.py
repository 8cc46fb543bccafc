"""The one pure tensor function between decoded pixels and the network.

Tiny and free of Python-side state: the ONNX export traces `preprocess` itself into the graph.
"""

import torch

from ..data.images import Letterbox

RESIZE = {
    "squash": "squash to image_size x image_size, bilinear (antialiased when shrinking)",
    "letterbox": "fit inside image_size x image_size keeping the shape, bilinear, centred on the image's mean colour",
}


def default_preprocessing(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), fit="squash", hands=None):
    """What the model file records about turning an image into network input (hands: how a landmark model's
    hands are found, data.hands.describe_finder())."""
    return {
        **({"hands": hands} if hands else {}),
        "decode": "RGB; EXIF orientation applied; transparency composited on white",
        "fit": fit,
        "resize": RESIZE[fit],
        "rescale": 1.0 / 255.0,
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW float",
    }


def to_unit(images_uint8_nhwc):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1] (the tutorial's rescale 1/255)."""
    return images_uint8_nhwc.permute(0, 3, 1, 2).float().mul_(1.0 / 255.0)


def normalize(x, mean, std):
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess(images_uint8_nhwc, mean, std):
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float: rescale to [0, 1], then (x - mean) / std."""
    return normalize(to_unit(images_uint8_nhwc), mean, std)


def decode_size(image_size, fit="squash"):
    """The size to decode images at: a plain int squashes, a data.images.Letterbox keeps the shape."""
    return Letterbox(image_size) if fit == "letterbox" else int(image_size)


def eval_batches(images, mean, std, device, batch_size=64):
    """In order, batches of uint8 NHWC images (a tensor, or DecodedImages: labels come along) ready for a model:
    on `device`, rescaled and normalised, channels-last. Yields x, or (x, labels) for DecodedImages. The one batch
    path of evaluation, feature extraction and inference."""
    labelled = not isinstance(images, torch.Tensor)
    for start in range(0, len(images), batch_size):
        part = slice(start, start + batch_size)
        pixels = images.take(part) if labelled else images[part]
        x = preprocess(to_device(pixels, device), mean, std).contiguous(memory_format=torch.channels_last)
        yield (x, to_device(images.labels[part], device)) if labelled else x


def to_device(batch, device):
    """A CPU batch on `device`: to a GPU through pinned memory without blocking (the copy overlaps the work
    already queued there); on the CPU, the same tensor."""
    device = torch.device(device)
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)
