"""Registry of architectures: a name -> a function building an nn.Module that outputs logits.

A model file stores the name and the keyword arguments, so loading rebuilds the same network.
"""
import torch
from torch import nn

_MODELS = {}


def register(fn):
    _MODELS[fn.__name__.replace("_", "-")] = fn
    return fn


def available_models():
    return sorted(_MODELS)


def create_model(name, num_classes, **kwargs):
    if name not in _MODELS:
        from .errors import FolderCNNError
        raise FolderCNNError(f"unknown model '{name}' (available: {', '.join(available_models())})")
    return _MODELS[name](num_classes=num_classes, **kwargs)


def _glorot_init(module):
    """Keras' default initialisation (glorot uniform weights, zero biases)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


@register
def tutorial_cnn(num_classes, image_size=150, dropout=0.5):
    """The Keras Rock-Paper-Scissors tutorial's CNN: 4 x (conv 3x3 valid + ReLU + maxpool), dense 512."""
    layers, channels, size = [], 3, image_size
    for width in (64, 64, 128, 128):
        layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels, size = width, (size - 2) // 2
    if size < 1:
        raise ValueError(f"tutorial-cnn needs image_size >= 46, got {image_size}")
    model = nn.Sequential(*layers, nn.Flatten(), nn.Dropout(dropout),
                          nn.Linear(channels * size * size, 512), nn.ReLU(inplace=True),
                          nn.Linear(512, num_classes))
    model.apply(_glorot_init)
    return model


def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@register
def fast_cnn(num_classes, widths=(24, 48, 96, 192), image_size=None, dropout=0.0):
    """A small CNN built for CPU speed.

    A strided stem does the first downsampling for almost nothing; each stage is two 3x3 conv+BN+ReLU
    at one resolution, then a 2x2 max-pool. Global average pooling keeps the head tiny and makes the
    network work at any input size.
    """
    w0, stages = widths[0], widths[1:]
    layers = [conv_bn(3, w0, stride=2)]
    channels = w0
    for width in stages:
        layers += [conv_bn(channels, width), conv_bn(width, width), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def predict_logits(model, x, tta=False):
    """Float32 logits; with tta, averaged over the image and its mirror image (test-time augmentation)."""
    logits = model(x).float()
    if tta:
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


@register
def effnet_lite0(num_classes, pretrained=False, dropout=0.2):
    """EfficientNet-Lite0 (4.0 M parameters with 1000 classes); pretrained: ImageNet weights, new head."""
    from .effnet import EfficientNetLite0, load_pretrained
    model = EfficientNetLite0(num_classes, dropout)
    return load_pretrained(model) if pretrained else model


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def summary(model, image_size):
    """Keras-style table of leaf layers, output shapes and parameter counts."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if len(list(module.children())) == 0:
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: rows.append(
                    (f"{name} ({type(m).__name__})", str(tuple(o.shape[1:])),
                     sum(p.numel() for p in m.parameters(recurse=False))))))
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    w = max([len(r[0]) for r in rows] + [20]) + 2
    line = "-" * (w + 36)
    out = [line, f"{'Layer (type)':<{w}}{'Output shape':<22}{'Param #':>14}", "=" * (w + 36)]
    out += [f"{n:<{w}}{s:<22}{p:>14,}" for n, s, p in rows]
    out += ["=" * (w + 36), f"Total params: {total:,}", f"Trainable params: {trainable:,}",
            f"Non-trainable params: {total - trainable:,}", line]
    return "\n".join(out)
