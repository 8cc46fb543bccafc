"""The model file: one safetensors file with the weights and everything needed to use them.

Metadata (JSON under the "foldercnn" key): format version, architecture and its arguments,
class names in order, image size, preprocessing, recipe, final metrics. No pickle anywhere.
"""
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import FolderCNNError
from .files import atomic_path
from .models import create_model

FORMAT_VERSION = 1
METADATA_KEY = "foldercnn"


def save_model(path, model, metadata):
    """Write weights + metadata atomically (temp file, fsync, rename)."""
    meta = {"format_version": FORMAT_VERSION, **metadata}
    for key in ("architecture", "arch_args", "classes", "image_size", "preprocessing"):
        if key not in meta:
            raise ValueError(f"model metadata needs '{key}'")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return Path(path)


def read_metadata(path):
    path = Path(path)
    if not path.is_file():
        raise FolderCNNError(f"model file not found: {path}")
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise FolderCNNError(f"{path} is not a safetensors model file ({e})") from None
    if raw is None:
        raise FolderCNNError(f"{path} is a safetensors file without foldercnn metadata")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise FolderCNNError(f"{path} has corrupt foldercnn metadata") from None
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise FolderCNNError(f"{path} was written by a newer foldercnn (format {meta['format_version']}); upgrade")
    return meta


def load_model(path, device="cpu"):
    """Rebuild the network from the file's metadata and load its weights (strict)."""
    meta = read_metadata(path)
    model = create_model(meta["architecture"], num_classes=len(meta["classes"]), **meta["arch_args"])
    try:
        state = load_file(str(path), device=str(device))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise FolderCNNError(f"{path}: weights do not fit architecture {meta['architecture']} ({e})") from None
    return model.to(device).eval(), meta
