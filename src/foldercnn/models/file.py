"""The model file: one safetensors file with the weights and everything needed to use them.

Metadata (JSON under the "foldercnn" key): format version, architecture and its arguments, class names in
order, image size, preprocessing, calibration, recipe, final metrics. No pickle anywhere.

A model file may come from someone else, so nothing in it is trusted: the header is read by hand (bounded),
the metadata checked against a schema, and the tensor names, shapes, dtypes and byte ranges compared with
what the architecture needs *before* the network is built or a byte of weights is read. Loading therefore
allocates at most what the file itself holds, and any defect is one FolderCNNError naming it.
"""

import json
import math
import struct
from pathlib import Path

from ..errors import FolderCNNError
from ..files import atomic_path
from .file_checks import FORMAT_VERSION, UNFAMILIAR_KEY, _fail, _is_int, validate_metadata

METADATA_KEY = "foldercnn"
MAX_HEADER_BYTES = 64 << 20  # safetensors' own limit is 100 MB; ours: a few KB of metadata + tensor index
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def save_model(path, model, metadata, unfamiliarity=None):
    """Write weights + metadata atomically (temp file, fsync, rename). unfamiliarity: a fitted
    models.unfamiliar.Unfamiliarity, stored as extra tensors plus the metadata section "unfamiliar"."""
    import torch
    from safetensors.torch import save_file

    meta = {"format_version": FORMAT_VERSION, **metadata}
    meta.pop(UNFAMILIAR_KEY, None)
    if unfamiliarity is not None:
        meta[UNFAMILIAR_KEY] = unfamiliarity.metadata()
    validate_metadata(meta, "the model being saved")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if unfamiliarity is not None:
        tensors.update(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unfamiliarity.tensors().items()}
        )
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return Path(path)


def read_header(path):
    """(metadata dict, {tensor name: {dtype, shape, data_offsets}}) of a model file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FolderCNNError(f"model file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FolderCNNError(f"{path} is not a safetensors model file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise FolderCNNError(
                f"{path} is not a safetensors model file (its header claims {n} bytes; the file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, a 5,000-digit number, 10,000 nested arrays
        raise FolderCNNError(f"{path} is not a safetensors model file (unreadable header)") from None
    if not isinstance(header, dict):
        raise FolderCNNError(f"{path} is not a safetensors model file (header is not an object)")
    extra = header.pop("__metadata__", None) or {}
    if not isinstance(extra, dict) or METADATA_KEY not in extra:
        raise FolderCNNError(f"{path} is a safetensors file without foldercnn metadata")
    try:
        meta = json.loads(extra[METADATA_KEY])
    except (TypeError, ValueError, RecursionError):
        raise FolderCNNError(
            f"{path} has corrupt foldercnn metadata (not JSON, too deeply nested, or a number too long to read)"
        ) from None
    validate_metadata(meta, str(path))
    _check_tensor_index(header, size - 8 - n, path)
    return meta, header


def read_metadata(path):
    return read_header(path)[0]


def _check_tensor_index(header, data_bytes, where):
    """Every tensor entry well formed, inside the file, its byte range matching its shape and dtype, and no
    two ranges overlapping (so the tensors together never claim more bytes than the file has)."""
    for name, entry in header.items():
        if not isinstance(entry, dict):
            _fail(where, f"tensor {name!r} has no description")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            _fail(where, f"tensor {name!r} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and len(shape) <= 8 and all(_is_int(d) and d >= 0 for d in shape)):
            _fail(where, f"tensor {name!r} has a malformed shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            _fail(where, f"tensor {name!r} lies outside the file (truncated or tampered)")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            _fail(where, f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype}")
    end = 0
    for start, stop in sorted(tuple(e["data_offsets"]) for e in header.values()):
        if start < end:
            _fail(where, "two tensors share bytes (tampered)")
        end = stop


def check_weights_match(meta, header, where):
    """The file's tensors are exactly those the architecture has: same names, shapes and dtypes."""
    import torch

    from . import unfamiliar
    from .registry import expected_tensors, feature_dim

    names = {torch.float32: "F32", torch.int64: "I64"}
    expected = expected_tensors(meta["architecture"], len(meta["classes"]), meta["arch_args"])
    section = meta.get(UNFAMILIAR_KEY)
    if section is not None:  # its tensors' shapes follow from the classes and the architecture's feature width
        d = feature_dim(meta["architecture"], len(meta["classes"]), meta["arch_args"])
        if section["feature_dim"] != d:
            _fail(
                where,
                f"unfamiliar feature_dim {section['feature_dim']} differs from architecture "
                f"{meta['architecture']}'s {d} features",
            )
        expected.update(
            {
                k: (shape, torch.float32)
                for k, shape in unfamiliar.expected_tensors(len(meta["classes"]), d, section["rank"]).items()
            }
        )
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        _fail(
            where,
            f"its tensors do not fit architecture {meta['architecture']} with {len(meta['classes'])} "
            f"classes (missing: {', '.join(missing[:3]) or 'none'}; unexpected: "
            f"{', '.join(extra[:3]) or 'none'})",
        )
    for name, (shape, dtype) in expected.items():
        entry = header[name]
        if tuple(entry["shape"]) != shape:
            _fail(
                where,
                f"tensor {name} has shape {entry['shape']}, architecture {meta['architecture']} needs {list(shape)}",
            )
        if entry["dtype"] != names.get(dtype, str(dtype)):
            _fail(where, f"tensor {name} is {entry['dtype']}, expected {names.get(dtype, dtype)}")


def _read_float32(path, entries):
    """{name: float32 array} of a few small tensors (already validated F32 entries), read by hand: only
    their own bytes are read."""
    import numpy as np

    out = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for name, e in entries.items():
            start, stop = e["data_offsets"]
            f.seek(8 + n + start)
            out[name] = np.frombuffer(f.read(stop - start), dtype="<f4").reshape(e["shape"]).copy()
    return out


# float dtype -> (unsigned view, exponent mask): all exponent bits set is an infinity or a NaN
_EXPONENT = {
    "F64": ("<u8", 0x7FF0000000000000),
    "F32": ("<u4", 0x7F800000),
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
}


def first_non_finite(path, header, chunk=1 << 20):
    """The name of the first float tensor holding a NaN or an infinity, read from the file in chunks through a
    memory map (never the whole file at once), or None."""
    import mmap

    import numpy as np

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        (n,) = struct.unpack("<Q", mm[:8])
        for name, e in header.items():
            if e["dtype"] not in _EXPONENT:
                continue
            view, mask = _EXPONENT[e["dtype"]]
            start, stop = 8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1]
            step = chunk * np.dtype(view).itemsize
            for at in range(start, stop, step):
                bits = np.frombuffer(
                    mm, dtype=view, count=(min(stop, at + step) - at) // np.dtype(view).itemsize, offset=at
                )
                found = ((bits & np.array(mask, dtype=view)) == np.array(mask, dtype=view)).any()
                del bits  # the memory map cannot close while a view of it lives
                if found:
                    return name
    return None


WEIGHT_BOUND = 1e6  # no trained weight comes near it; 3e38 passes the NaN check and overflows to NaN in one layer


def degenerate_weight(weights):
    """Why finite weights cannot give finite answers (one beyond WEIGHT_BOUND), or None."""
    for name, t in weights.items():
        if t.is_floating_point() and t.numel() and float(t.abs().max()) > WEIGHT_BOUND:
            return f"tensor {name} holds {float(t.abs().max()):.3g}, beyond any trained weight ({WEIGHT_BOUND:g})"
    return None


def model_check(model, weights):
    """The architecture's own check of its weights (`check_weights(weights)` -> reason or None), if it has one."""
    check = getattr(model, "check_weights", None)
    return check(weights) if check is not None else None


def load_model_file(path, device="cpu"):
    """Validate the file, then build the network from its metadata and load its weights (strict).

    Returns (model, metadata, Unfamiliarity or None: files without the "unfamiliar" section have none)."""
    import numpy as np
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .registry import create_model
    from .unfamiliar import PREFIX, Unfamiliarity

    meta, header = read_header(path)
    check_weights_match(meta, header, str(path))
    unfamiliarity = None
    try:
        if UNFAMILIAR_KEY in meta:  # checked before the network is built: a bad file costs only these bytes
            extra = _read_float32(path, {k: v for k, v in header.items() if k.startswith(PREFIX)})
            if not all(np.isfinite(v).all() for v in extra.values()):
                _fail(str(path), "its unfamiliar tensors hold NaN or infinite values (tampered)")
            unfamiliarity = Unfamiliarity.from_file(
                {k: torch.from_numpy(v) for k, v in extra.items()}, meta[UNFAMILIAR_KEY]
            )
        bad = first_non_finite(path, header)
        if bad is not None:  # every prediction would be "paper (nan%)"
            _fail(str(path), f"its weights hold NaN or infinite values (tensor {bad})")
        model = create_model(meta["architecture"], num_classes=len(meta["classes"]), **meta["arch_args"])
        tensors = load_file(str(path), device=str(device))
        weights = {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
        problem = degenerate_weight(weights) or model_check(model, weights)
        if problem:  # finite, yet every answer would be NaN
            _fail(str(path), f"{problem}: it cannot give finite answers (damaged or tampered)")
        model.load_state_dict(weights, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        _fail(str(path), f"its weights could not be read ({e})")
    return model.to(device).eval(), meta, unfamiliarity


def load_model(path, device="cpu"):
    """(model, metadata) of a validated model file; see load_model_file."""
    model, meta, _ = load_model_file(path, device)
    return model, meta
