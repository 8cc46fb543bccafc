"""Classify images with an ONNX file exported by `foldercnn export`: numpy, Pillow and onnxruntime only (the code
lives in models/onnx_model.py; this name stays for scripts that import it from here)."""

from ..models.onnx_model import OnnxClassifier, is_onnx  # noqa: F401 (re-exported)
