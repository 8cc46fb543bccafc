"""foldercnn: a folder of labelled images -> a trained, evaluated, deployable image classifier, on a CPU.

    import foldercnn
    result = foldercnn.train("photos/", "runs/photos")           # one sub-folder per class
    model = foldercnn.load("runs/photos/model.safetensors")
    print(model.predict("new.jpg").label)
"""
__version__ = "0.1.0"

from .errors import FolderCNNError  # noqa: E402
from .evaluate import evaluate_folder as evaluate  # noqa: E402
from .inspection import inspect_folder as inspect  # noqa: E402
from .predict import Classifier, Prediction, load, predict_paths  # noqa: E402
from .train import train_folder as train  # noqa: E402

__all__ = ["FolderCNNError", "Classifier", "Prediction", "load", "train", "evaluate", "inspect",
           "predict_paths", "__version__"]
