"""The one public `load`: a model file -> a classifier (models.prediction.ImageClassifier), whichever kind."""

from .onnx_model import OnnxClassifier, is_onnx


def load(path, device="cpu", threads=None):
    """A `.onnx` file from `foldercnn export` -> OnnxClassifier (onnxruntime; PyTorch is not imported); a
    model.safetensors -> the PyTorch Classifier on `device`. threads: onnxruntime's threads (None: its default)."""
    if is_onnx(path):
        return OnnxClassifier(path, threads)
    from .inference import load as load_safetensors

    return load_safetensors(path, device)
