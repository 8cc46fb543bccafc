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

FORMAT_VERSION = 1
METADATA_KEY = "foldercnn"
MAX_HEADER_BYTES = 64 << 20  # safetensors' own limit is 100 MB; ours: a few KB of metadata + tensor index
MAX_CLASSES = 10_000
MAX_CLASS_NAME = 255
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}
REQUIRED = ("architecture", "arch_args", "classes", "image_size", "preprocessing")
UNFAMILIAR_KEY = "unfamiliar"  # optional section; its tensors are allowed only when it is there


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
        tensors.update({k: v.detach().to("cpu", torch.float32).contiguous()
                        for k, v in unfamiliarity.tensors().items()})
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
            raise FolderCNNError(f"{path} is not a safetensors model file (its header claims {n} bytes; "
                                 f"the file has {size})")
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
        raise FolderCNNError(f"{path} has corrupt foldercnn metadata (not JSON, too deeply nested, or a number "
                             "too long to read)") from None
    validate_metadata(meta, str(path))
    _check_tensor_index(header, size - 8 - n, path)
    return meta, header


def read_metadata(path):
    return read_header(path)[0]


def _fail(where, problem):
    raise FolderCNNError(f"{where}: {problem}; this is not a usable foldercnn model file")


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_metadata(meta, where):
    """Types and ranges of every field a model file's user relies on."""
    from .registry import get_spec
    if not isinstance(meta, dict):
        _fail(where, "the metadata is not an object")
    version = meta.get("format_version", 0)
    if not _is_int(version) or version < 1:
        _fail(where, f"format_version {version!r} is not a positive whole number")
    if version > FORMAT_VERSION:
        raise FolderCNNError(f"{where} was written by a newer foldercnn (format {version}); upgrade foldercnn")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        _fail(where, f"the metadata lacks {', '.join(missing)}")
    arch = meta["architecture"]
    if not isinstance(arch, str):
        _fail(where, "architecture is not a name")
    try:
        spec = get_spec(arch)
        spec.check_args(meta["arch_args"])
        spec.check_image_size(meta["image_size"], "image_size")
    except FolderCNNError as e:
        _fail(where, str(e))
    if "image_size" in meta["arch_args"] and meta["arch_args"]["image_size"] not in (None, meta["image_size"]):
        _fail(where, f"arch_args image_size {meta['arch_args']['image_size']} differs from image_size "
                     f"{meta['image_size']}")
    classes = meta["classes"]
    if not isinstance(classes, list) or not 2 <= len(classes) <= MAX_CLASSES:
        _fail(where, f"classes must be a list of 2 to {MAX_CLASSES} names")
    if not all(isinstance(c, str) and c.strip() and len(c) <= MAX_CLASS_NAME for c in classes):
        _fail(where, f"every class name must be a non-empty string of at most {MAX_CLASS_NAME} characters")
    if len(set(classes)) != len(classes):
        _fail(where, "class names repeat")
    pre = meta["preprocessing"]
    if not isinstance(pre, dict):
        _fail(where, "preprocessing is not an object")
    for key in ("mean", "std"):
        v = pre.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(_is_number(x) for x in v)):
            _fail(where, f"preprocessing {key} must be a list of 3 numbers")
    if not all(x > 0 for x in pre["std"]):
        _fail(where, "preprocessing std must be positive")
    if pre.get("fit", "squash") not in ("squash", "letterbox"):
        _fail(where, f"preprocessing fit {pre.get('fit')!r} is neither 'squash' nor 'letterbox'")
    if spec.input == "hand-landmarks":
        _validate_hands(pre, where)
    if "rescale" in pre and not (_is_number(pre["rescale"]) and pre["rescale"] > 0):
        _fail(where, "preprocessing rescale must be a positive number")
    cal = meta.get("calibration")
    if cal is not None:
        if not isinstance(cal, dict):
            _fail(where, "calibration is not an object")
        t = cal.get("temperature", 1.0)
        if not (_is_number(t) and 0.01 <= t <= 100):
            _fail(where, f"calibration temperature {t!r} is not a number in [0.01, 100]")
        u = cal.get("uncertain_below", 0.8)
        if not (_is_number(u) and 0 <= u <= 1):
            _fail(where, f"calibration uncertain_below {u!r} is not a number in [0, 1]")
    if "tta" in meta and not isinstance(meta["tta"], bool):
        _fail(where, "tta must be true or false")
    _check_finite(meta, where, "metadata")
    _validate_shown(meta, where)
    if UNFAMILIAR_KEY in meta:
        _validate_unfamiliar(meta[UNFAMILIAR_KEY], where)


def _check_finite(value, where, at, depth=0):
    """No NaN or infinity anywhere (JSON cannot carry them back out: GET /model answered 500)."""
    if depth > 32:
        _fail(where, f"{at} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        _fail(where, f"{at} is {value}, not a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, where, f"{at}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, where, f"{at}[{i}]", depth + 1)


METRIC_RANGES = {"val_accuracy": (0, 1), "train_accuracy": (0, 1), "val_loss": (0, 1e9), "train_loss": (0, 1e9)}
COUNTS = ("epoch", "epochs_run", "n_train", "n_val")


def _validate_shown(meta, where):
    """The fields the report, the serve page and GET /model show: their types and ranges."""
    for key in ("metrics", "timing", "data", "recipe"):
        if key in meta and not isinstance(meta[key], dict):
            _fail(where, f"{key} is not an object")
    metrics = meta.get("metrics") or {}
    for key, (lo, hi) in METRIC_RANGES.items():
        if key in metrics and not (_is_number(metrics[key]) and lo <= metrics[key] <= hi):
            _fail(where, f"metrics {key} {metrics[key]!r} is not a number between {lo} and {hi:g}")
    for key in COUNTS:
        if key in metrics and not (_is_int(metrics[key]) and 0 <= metrics[key] <= 1 << 40):
            _fail(where, f"metrics {key} {metrics[key]!r} is not a whole number >= 0")
    if not all(_is_number(v) for v in (meta.get("timing") or {}).values()):
        _fail(where, "timing holds something that is not a number")
    if "seed" in meta and not (_is_int(meta["seed"]) and 0 <= meta["seed"] < 1 << 64):
        _fail(where, f"seed {str(meta['seed'])[:20]!r} is not a whole number between 0 and 2**64")


def _validate_hands(pre, where):
    """A landmark model's hands must be found as they were in training: the same finder, letterboxed images."""
    from ..data.hands import CACHE_VERSION, MODEL_COMPLEXITY
    if pre.get("fit") != "letterbox":
        _fail(where, "a hand-landmarks model needs preprocessing fit 'letterbox'")
    hands = pre.get("hands")
    if not isinstance(hands, dict) or not _is_int(hands.get("version")) or \
            hands.get("model_complexity") not in (0, 1):
        _fail(where, "a hand-landmarks model needs preprocessing.hands with the finder's version and model_complexity")
    if (hands["version"], hands["model_complexity"]) != (CACHE_VERSION, MODEL_COMPLEXITY):
        raise FolderCNNError(f"{where} was trained on hands found by another hand finder (version {hands['version']}, "
                             f"model_complexity {hands['model_complexity']}; this foldercnn has version {CACHE_VERSION}, "
                             f"model_complexity {MODEL_COMPLEXITY}): train it again")


def _validate_unfamiliar(section, where):
    from .unfamiliar import SCORE
    if not isinstance(section, dict):
        _fail(where, "the unfamiliar section is not an object")
    if section.get("score") != SCORE:
        _fail(where, f"unfamiliar score {section.get('score')!r} is unknown (expected {SCORE!r})")
    t = section.get("threshold")
    if not (_is_number(t) and t > 0):
        _fail(where, f"unfamiliar threshold {t!r} is not a finite positive number")
    if not isinstance(section.get("rule"), str):
        _fail(where, "unfamiliar rule is not text")
    d, r = section.get("feature_dim"), section.get("rank")
    if not (_is_int(d) and 1 <= d <= 1 << 16):
        _fail(where, f"unfamiliar feature_dim {d!r} is not a whole number between 1 and 65536")
    if not (_is_int(r) and 1 <= r <= d):
        _fail(where, f"unfamiliar rank {r!r} is not a whole number between 1 and feature_dim {d}")
    inv_rest = section.get("inv_rest")
    if not (_is_number(inv_rest) and inv_rest >= 0):
        _fail(where, f"unfamiliar inv_rest {inv_rest!r} is not a finite number >= 0")
    if r < d and inv_rest == 0:
        _fail(where, "a low-rank unfamiliar section needs a positive inv_rest")
    if "shrinkage" in section and not (_is_number(section["shrinkage"]) and 0 <= section["shrinkage"] <= 1):
        _fail(where, "unfamiliar shrinkage is not a number in [0, 1]")


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
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
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
            _fail(where, f"unfamiliar feature_dim {section['feature_dim']} differs from architecture "
                         f"{meta['architecture']}'s {d} features")
        expected.update({k: (shape, torch.float32) for k, shape in
                         unfamiliar.expected_tensors(len(meta["classes"]), d, section["rank"]).items()})
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        _fail(where, f"its tensors do not fit architecture {meta['architecture']} with {len(meta['classes'])} "
                     f"classes (missing: {', '.join(missing[:3]) or 'none'}; unexpected: "
                     f"{', '.join(extra[:3]) or 'none'})")
    for name, (shape, dtype) in expected.items():
        entry = header[name]
        if tuple(entry["shape"]) != shape:
            _fail(where, f"tensor {name} has shape {entry['shape']}, architecture {meta['architecture']} "
                         f"needs {list(shape)}")
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
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
             "BF16": ("<u2", 0x7F80)}


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
                bits = np.frombuffer(mm, dtype=view, count=(min(stop, at + step) - at) // np.dtype(view).itemsize,
                                     offset=at)
                found = ((bits & np.array(mask, dtype=view)) == np.array(mask, dtype=view)).any()
                del bits  # the memory map cannot close while a view of it lives
                if found:
                    return name
    return None


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
            unfamiliarity = Unfamiliarity.from_file({k: torch.from_numpy(v) for k, v in extra.items()},
                                                    meta[UNFAMILIAR_KEY])
        bad = first_non_finite(path, header)
        if bad is not None:  # every prediction would be "paper (nan%)"
            _fail(str(path), f"its weights hold NaN or infinite values (tensor {bad})")
        model = create_model(meta["architecture"], num_classes=len(meta["classes"]), **meta["arch_args"])
        tensors = load_file(str(path), device=str(device))
        model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(PREFIX)}, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        _fail(str(path), f"its weights could not be read ({e})")
    return model.to(device).eval(), meta, unfamiliarity


def load_model(path, device="cpu"):
    """(model, metadata) of a validated model file; see load_model_file."""
    model, meta, _ = load_model_file(path, device)
    return model, meta
