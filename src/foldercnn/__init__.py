"""foldercnn: a folder of labelled images -> a trained, evaluated, deployable image classifier, on a CPU.

    import foldercnn
    foldercnn.runtime.setup()                                     # optional: fast CPU settings
    result = foldercnn.train("photos/", "runs/photos")           # one sub-folder per class
    model = foldercnn.load("runs/photos/model.safetensors")
    print(model.predict("new.jpg").label)

Importing the package imports nothing heavy and changes nothing in the caller's process: each name below is
loaded on first use (so `foldercnn --version` does not import PyTorch).
"""

import importlib

from .errors import FolderCNNError
from .version import __version__

# public name -> (module, attribute)
_API = {
    "train": ("foldercnn.training.job", "train_folder"),
    "evaluate": ("foldercnn.evaluation.metrics", "evaluate_folder"),
    "inspect": ("foldercnn.data.inspect", "inspect_folder"),
    "load": ("foldercnn.models.load", "load"),
    "Classifier": ("foldercnn.models.inference", "Classifier"),
    "Prediction": ("foldercnn.models.inference", "Prediction"),
    "predict_paths": ("foldercnn.deploy.predict", "predict_paths"),
}

__all__ = ["FolderCNNError", "__version__", *_API]


_SUBMODULES = ("runtime", "data", "models", "training", "evaluation", "deploy")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"foldercnn.{name}")
    if name in _API:
        module, attr = _API[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'foldercnn' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API) | set(_SUBMODULES))
