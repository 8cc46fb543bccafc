"""`foldercnn export`: a model file -> one self-contained ONNX file whose graph does everything after decoding.

Input `images`: uint8 RGB, N x S x S x 3 at the model's input size, N dynamic (what a camera or an image
decoder gives). Inside the graph, exactly `Classifier.probabilities`: rescale 1/255, (x - mean) / std,
NHWC -> NCHW, the network, flip test-time augmentation when the model file asks for it, division by the
calibration temperature, softmax. Outputs `probabilities` (N x classes) and `logits` (before temperature).
Class names, image size, the decode/resize rule, temperature, uncertain threshold and foldercnn's version
are in the ONNX `metadata_props`, so `models.onnx_model.OnnxClassifier` needs only the file.

Exporter: the torch.export-based one (`dynamo=True`). Only the batch is dynamic, so EfficientNet's
TensorFlow-style padding (computed from the input shape) becomes constants, and the exporter's optimiser folds
batch-norm into the convolutions: a plain graph. The older TorchScript exporter traced that padding into
~1,500 nodes of shape arithmetic.

`--int8`: post-training static quantisation with onnxruntime's tools, calibrated on training images. Only the
network body is quantised (first Conv up to the classifier); preprocessing, classifier, TTA, temperature and
softmax stay float32. Measured choices (2-core AMD EPYC, AVX2 without VNNI; benchmarks/export.py):
- reduce_range (7-bit weights): without VNNI onnxruntime multiplies uint8 activations by int8 weights with
  vpmaddubsw, whose int16 pair sums saturate; full-range per-channel weights cost fast-cnn 25 points.
- depthwise convolutions stay float: quantised, they flipped 10% of EfficientNet-Lite0's predictions.
- QDQ format (onnxruntime's recommended one; QOperator gave the same numbers and speed).
"""

import contextlib
import copy
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..data.decode import decode_images, walk_images
from ..errors import FolderCNNError, OptionError
from ..files import atomic_path, check_out_dir
from ..models.inference import load
from ..models.registry import get_spec
from ..version import __version__
from .deployable import Deployable, metadata_props  # noqa: F401 (moved there; imported from here too)

INPUT = "images"
OUTPUTS = ("probabilities", "logits")
DEFAULT_OPSET = 18  # the torch.export-based exporter's lowest opset
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul", "Add", "MaxPool", "GlobalAveragePool", "Relu", "Clip")


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings are not the user's business."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _needs(package):
    try:
        return __import__(package)
    except ImportError:
        raise FolderCNNError(f"export needs {package} (pip install 'foldercnn[export]')") from None


def export_onnx(model, metadata, out_path, opset=DEFAULT_OPSET, unfamiliarity=None):
    """Write `model` with its preprocessing and calibration (and the unfamiliarity score, when the model file
    has one: a third output `unfamiliarity`, above 1 meaning unfamiliar) as one ONNX file (atomically)."""
    onnx = _needs("onnx")
    _needs("onnxscript")
    size = int(metadata["image_size"])
    wrapper = Deployable(copy.deepcopy(model).float().eval(), metadata, unfamiliarity).eval()
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    outputs = list(OUTPUTS) + (["unfamiliarity"] if unfamiliarity is not None else [])
    with _quiet():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=[INPUT],
            output_names=outputs,
            dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
        )
    proto = program.model_proto  # weights inline: export(f=...) would write a separate .data file
    onnx.helper.set_model_props(proto, metadata_props(metadata))
    proto.producer_name, proto.producer_version = "foldercnn", __version__
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out_path) as tmp:
        onnx.save_model(proto, str(tmp))
    return Path(out_path)


def _network_nodes(model):
    """Nodes to quantise: first Conv up to (not including) the classifier; depthwise convolutions stay float.
    An ONNX graph's nodes are stored in topological order, so a slice of the list is a slice of the network."""
    nodes = list(model.graph.node)
    first = next(i for i, n in enumerate(nodes) if n.op_type == "Conv")
    last = next(
        i
        for i, n in enumerate(nodes)
        if n.op_type in ("Gemm", "MatMul") and i > first and n.name in _classifier_nodes(model)
    )
    groups = lambda n: next((a.i for a in n.attribute if a.name == "group"), 1)  # noqa: E731
    return [
        n.name for n in nodes[first:last] if n.op_type in QUANTIZED_OPS and not (n.op_type == "Conv" and groups(n) > 1)
    ]


def _classifier_nodes(model):
    """The node(s) producing the `logits` output's input chain's last matrix product: the classifier."""
    producers = {o: n for n in model.graph.node for o in n.output}
    names, todo = set(), ["logits"]
    while todo:
        node = producers.get(todo.pop())
        if node is None:
            continue
        if node.op_type in ("Gemm", "MatMul"):
            names.add(node.name)
            continue
        todo += list(node.input)
    return names


def quantize_int8(fp32_path, out_path, calibration_images, batch_size=20):
    """An int8 copy of an exported file, calibrated on (N, S, S, 3) uint8 images (static, QDQ, per channel)."""
    onnx = _needs("onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.start = 0

        def get_next(self):
            if self.start >= len(calibration_images):
                return None
            self.start += batch_size
            return {INPUT: np.ascontiguousarray(calibration_images[self.start - batch_size : self.start])}

        def rewind(self):
            self.start = 0

    source = onnx.load(str(fp32_path))
    with tempfile.TemporaryDirectory() as tmp, _quiet():
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(source, prepared)  # shape inference + constant folding, as quantize_static wants
        model = onnx.load(prepared)
        quantized = os.path.join(tmp, "int8.onnx")
        quantize_static(
            model,
            quantized,
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=_network_nodes(model),
        )
        out = onnx.load(quantized)
    props = {p.key: p.value for p in source.metadata_props}
    onnx.helper.set_model_props(out, {**props, "quantization": "int8 static QDQ, per-channel, reduce_range"})
    onnx.checker.check_model(out)
    with atomic_path(out_path) as tmp:
        onnx.save_model(out, str(tmp))
    return Path(out_path)


def calibration_sample(folder, size, limit=200, seed=0):
    """Up to `limit` images spread over every class folder (or just image files) under `folder`, decoded."""
    files = walk_images(folder, [])
    if not files:
        raise FolderCNNError(f"no images found under {folder} for int8 calibration")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), min(limit, len(files)), replace=False).tolist())
    array, good, _ = decode_images([files[i] for i in chosen], size, desc="calibration images")
    if len(good) == 0:
        raise FolderCNNError(f"no readable images under {folder} for int8 calibration")
    labels = [Path(files[chosen[i]]).relative_to(folder).parts[0] for i in good]
    return array, labels


def median_seconds(run, x, repeats=30):
    """Median wall time of run(x) over `repeats` calls, after one warm-up call."""
    run(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def export_model(model_path, out=None, fmt="onnx", int8=False, calibration_dir=None, opset=DEFAULT_OPSET, log=print):
    """Export a model file; check the ONNX file against PyTorch; with int8 also quantise and report what it
    costs and gains. Returns the path(s) written."""
    if fmt != "onnx":
        raise FolderCNNError(f"unknown export format '{fmt}' (available: onnx)")
    if not 18 <= opset <= 23:
        raise OptionError("opset", f"must be between 18 and 23, got {opset}")
    classifier = load(model_path)
    meta = classifier.metadata
    out = _output_path(model_path, out, meta)
    if get_spec(meta["architecture"]).input == "hand-landmarks":
        return export_hands(classifier, out, int8, calibration_dir, opset, log)
    if int8 and calibration_dir is None:
        calibration_dir = _training_folder(meta)
    export_onnx(classifier.model, meta, out, opset, classifier.unfamiliarity)
    log(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, opset {opset}, {meta['architecture']}, "
        f"{len(meta['classes'])} classes, input uint8 N x {meta['image_size']} x {meta['image_size']} x 3)"
    )
    images, labels = _parity_images(classifier, calibration_dir)
    onnx_fp32, got = _check_parity(classifier, out, images, log)
    if not int8:
        return [out]
    return [out, _export_int8(classifier, out, opset, images, labels, onnx_fp32, got, log)]


class HandHead(torch.nn.Module):
    """A hands model's graph: (N, features) float32 -> (calibrated probabilities, logits). The hand finder runs
    before it (data/hands.py, on the ONNX files beside it), and the features are models/hand_features.py's."""

    def __init__(self, net, temperature):
        super().__init__()
        self.net, self.temperature = net, float(temperature)

    def forward(self, features):
        logits = self.net(features)
        return torch.softmax(logits / self.temperature, dim=1), logits


def export_hands(classifier, out, int8, calibration_dir, opset, log):
    """A hands model as ONNX: the head's graph at OUT, and the hand finder's two ONNX files beside it (for use
    outside foldercnn; foldercnn's OnnxClassifier runs its own copies, which are the same files)."""
    from ..data.hand_finder import MODELS_DIR
    from ..data.hands import MODELS
    from ..models.hand_features import FEATURES
    from ..models.onnx_model import FEATURES_INPUT

    if int8:
        raise OptionError("int8", "a hands model's head has under a thousand weights: there is nothing to quantise")
    onnx = _needs("onnx")
    _needs("onnxscript")
    meta = classifier.metadata
    temperature = (meta.get("calibration") or {}).get("temperature", 1.0)
    wrapper = HandHead(copy.deepcopy(classifier.model).float().eval(), temperature).eval()
    with _quiet():
        program = torch.onnx.export(
            wrapper,
            (torch.zeros(2, FEATURES),),
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=[FEATURES_INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={FEATURES_INPUT: {0: torch.export.Dim("batch")}},
        )
    proto = program.model_proto
    props = metadata_props(meta)
    props["input"] = (
        f"features: float32 N x {FEATURES}, models/hand_features.py's hand_features of the hand found by the "
        "finder in 'preprocessing' (its ONNX files beside this one) in the image letterboxed to image_size"
    )
    onnx.helper.set_model_props(proto, props)
    proto.producer_name, proto.producer_version = "foldercnn", __version__
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    written = [out]
    for name in MODELS:
        copy_to = out.with_name(f"{out.stem}.{name}.onnx")
        with atomic_path(copy_to) as tmp:
            tmp.write_bytes((MODELS_DIR / f"{name}.onnx").read_bytes())
        written.append(copy_to)
    log(
        f"wrote {out} (the head: {len(meta['classes'])} classes, input float32 N x {FEATURES} hand features, "
        f"opset {opset}) and the hand finder's {', '.join(p.name for p in written[1:])}"
    )
    if calibration_dir is None:
        train_dir = (meta.get("data") or {}).get("train_dir")
        calibration_dir = train_dir if train_dir and Path(train_dir).is_dir() else None
    images, _ = _parity_images(classifier, calibration_dir)
    _check_parity(classifier, out, images, log)
    return written


def _output_path(model_path, out, meta):
    """The .onnx path to write (default: beside the model file), in a folder that exists outside the data."""
    out = Path(out) if out else Path(model_path).with_suffix(".onnx")
    if out.suffix.lower() != ".onnx":
        raise OptionError("out", f"must end in .onnx, got {out}")
    if not out.parent.is_dir():
        raise FolderCNNError(f"the folder {out.parent} does not exist; create it first (export makes no folders)")
    check_out_dir(out.parent, [(meta.get("data") or {}).get("train_dir")])
    return out


def _training_folder(meta):
    """The model's own training folder, for int8 calibration when none was given."""
    train_dir = (meta.get("data") or {}).get("train_dir")
    if not train_dir or not Path(train_dir).is_dir():
        raise OptionError(
            "int8",
            "needs a calibration folder (calibration_dir: training images; the model's own "
            "training folder was not found)",
        )
    return train_dir


def _parity_images(classifier, calibration_dir):
    """(images, labels or None): the calibration sample, or generated noise when there is none."""
    if calibration_dir is not None:
        return calibration_sample(Path(calibration_dir), classifier.image_size)
    images = np.random.default_rng(0).integers(
        0, 256, (16, classifier.image_size, classifier.image_size, 3), dtype=np.uint8
    )
    return images, None


def _check_parity(classifier, out, images, log):
    """Log how closely the ONNX file's probabilities (and unfamiliarity) match PyTorch's on images like the user's;
    returns (the fp32 OnnxClassifier, its probabilities)."""
    from ..models.onnx_model import OnnxClassifier

    reference = classifier.probabilities(images)
    onnx_fp32 = OnnxClassifier(out)
    got = onnx_fp32.probabilities(images)
    check = (
        f"check: {len(images)} images, max |probability difference| vs PyTorch "
        f"{np.abs(got - reference).max():.2e}, same top-1 for {(got.argmax(1) == reference.argmax(1)).sum()} "
        f"of {len(images)}"
    )
    if onnx_fp32.has_unfamiliarity:
        u_onnx = onnx_fp32.outputs(images)[1]
        u_torch = classifier.logits_and_unfamiliarity(torch.from_numpy(images))[1].numpy()
        check += (
            f"; unfamiliarity max relative difference "
            f"{np.abs(u_onnx - u_torch).max() / max(1e-9, np.abs(u_torch).max()):.1e}, "
            f"same flag for {((u_onnx > 1) == (u_torch > 1)).sum()} of {len(images)}"
        )
    log(check)
    return onnx_fp32, got


def _export_int8(classifier, out, opset, images, labels, onnx_fp32, got, log):
    """Write and measure the int8 copy beside OUT; returns its path."""
    from ..models.onnx_model import OnnxClassifier

    # calibrate on every other sampled image; measure what int8 costs on the rest (not seen by the calibrator)
    out8 = out.with_name(out.stem + ".int8.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        # onnxruntime's quantiser cannot prepare the unfamiliarity branch's graph: the int8 file carries
        # probabilities and logits only (the fp32 file has the score)
        plain = (
            export_onnx(classifier.model, classifier.metadata, Path(tmp) / "plain.onnx", opset)
            if classifier.unfamiliarity is not None
            else out
        )
        quantize_int8(plain, out8, images[::2])
    onnx_int8 = OnnxClassifier(out8)
    held_out, fp32_probs = images[1::2], got[1::2]
    got8 = onnx_int8.probabilities(held_out)
    agree = float((got8.argmax(1) == fp32_probs.argmax(1)).mean())
    msg = (
        f"wrote {out8} ({out8.stat().st_size / 2**20:.1f} MB), calibrated on {len(images[::2])} images; on "
        f"{len(held_out)} others: top-1 agrees with fp32 on {agree:.1%}"
    )
    if labels is not None and set(labels) <= set(classifier.classes):
        truth = np.array([classifier.classes.index(c) for c in labels[1::2]])
        acc32, acc8 = float((fp32_probs.argmax(1) == truth).mean()), float((got8.argmax(1) == truth).mean())
        msg += f", accuracy {acc32:.1%} (fp32) -> {acc8:.1%} (int8)"
    one = images[:1]
    ms32 = 1000 * median_seconds(onnx_fp32.probabilities, one)
    ms8 = 1000 * median_seconds(onnx_int8.probabilities, one)
    log(msg + f"; one image {ms32:.2f} ms (fp32) -> {ms8:.2f} ms (int8), {ms32 / ms8:.2f}x faster")
    return out8
