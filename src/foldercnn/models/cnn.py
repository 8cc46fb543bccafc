"""The two small CNNs trained from scratch: the Keras tutorial's network and a CPU-fast batch-norm CNN.

Both are nn.Sequential subclasses, so their state-dict keys ("0.weight", ...) stay those of older model files.
"""

from torch import nn

from ..errors import FolderCNNError


def _glorot_init(module):
    """Keras' default initialisation (glorot uniform weights, zero biases)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


class SequentialClassifier(nn.Sequential):
    """A Sequential whose last layer is the linear classifier: features are everything before it."""

    @property
    def head(self):
        return self[-1]

    def features(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x

    def _map_end(self):
        """Index of the last max-pool: the layers before it end with the last convolution."""
        return max(i for i, layer in enumerate(self) if isinstance(layer, nn.MaxPool2d))

    def feature_map(self, x):
        """(N, C, h, w): the last convolution's output, before its pooling (what explanations weigh)."""
        for layer in list(self)[: self._map_end()]:
            x = layer(x)
        return x

    def map_layers(self):
        """The layers that make feature_map's output, in order (where each map cell sits: explain.map_geometry)."""
        return list(self)[: self._map_end()]

    def pool_features(self, feature_map):
        """The penultimate features from feature_map's output: features(x) == pool_features(feature_map(x))."""
        x = feature_map
        for layer in list(self)[self._map_end() : -1]:
            x = layer(x)
        return x

    def freeze_for_fine_tuning(self, blocks):
        raise FolderCNNError(f"{type(self).__name__} has no pretrained blocks to fine-tune")

    def unfreeze(self):
        for p in self.parameters():
            p.requires_grad_(True)
        return self


class TutorialCNN(SequentialClassifier):
    """The Keras Rock-Paper-Scissors tutorial's CNN: 4 x (conv 3x3 valid + ReLU + maxpool), dense 512."""


class FastCNN(SequentialClassifier):
    """A small CNN built for CPU speed (see fast_cnn)."""


def tutorial_output_side(image_size):
    size = image_size
    for _ in range(4):
        size = (size - 2) // 2
    return size


def tutorial_cnn(num_classes, image_size=150, dropout=0.5, pretrained=False):
    layers, channels = [], 3
    for width in (64, 64, 128, 128):
        layers += [nn.Conv2d(channels, width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        channels = width
    size = tutorial_output_side(image_size)
    model = TutorialCNN(
        *layers,
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels * size * size, 512),
        nn.ReLU(inplace=True),
        nn.Linear(512, num_classes),
    )
    model.apply(_glorot_init)
    return model


def conv_bn(c_in, c_out, stride=1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def fast_cnn(num_classes, widths=(24, 48, 96, 192), image_size=None, dropout=0.0, pretrained=False):
    """A strided stem does the first downsampling for almost nothing; each stage is two 3x3 conv+BN+ReLU
    at one resolution, then a 2x2 max-pool. Global average pooling keeps the head tiny and makes the
    network work at any input size."""
    w0, stages = widths[0], widths[1:]
    layers = [conv_bn(3, w0, stride=2)]
    channels = w0
    for width in stages:
        layers += [conv_bn(channels, width), conv_bn(width, width), nn.MaxPool2d(2)]
        channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)]
    return FastCNN(*layers)
