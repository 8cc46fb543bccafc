"""Make the ONNX hand models that ship inside foldercnn from MediaPipe's TensorFlow Lite files.

    pip install mediapipe==0.10.14 tflite==2.18.0 onnx onnxruntime ai-edge-litert
    python scripts/make_hand_models.py            # writes src/foldercnn/data/hand_models/*.onnx and NOTICE

MediaPipe Hands' palm detector and 21-point landmark model (Apache 2.0, by Google) ship inside the
`mediapipe==0.10.14` wheel as .tflite files with float16 weights. This script reads each file with the `tflite`
flatbuffer reader and writes the same graph in ONNX, op by op (13 kinds of op are used; any other is an error),
keeping the weights in float16 behind a Cast so that the files stay the size of the originals. Activations stay
NCHW inside the graph; the input stays NHWC like the original. It then runs both the original (LiteRT's
interpreter) and the ONNX file (onnxruntime) on the same inputs and refuses to write a model whose outputs differ
by more than the stated tolerance.
"""

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import tflite
from onnx import TensorProto, helper, numpy_helper
from tflite.ActivationFunctionType import ActivationFunctionType
from tflite.BuiltinOperator import BuiltinOperator
from tflite.Padding import Padding
from tflite.TensorType import TensorType

MODELS = {
    "palm_detection_lite": "modules/palm_detection/palm_detection_lite.tflite",
    "palm_detection_full": "modules/palm_detection/palm_detection_full.tflite",
    "hand_landmark_lite": "modules/hand_landmark/hand_landmark_lite.tflite",
    "hand_landmark_full": "modules/hand_landmark/hand_landmark_full.tflite",
}
OUT = Path(__file__).resolve().parents[1] / "src" / "foldercnn" / "data" / "hand_models"
TOLERANCE = 2e-3  # largest absolute difference allowed between LiteRT's and onnxruntime's outputs
OPSET = 17
OP_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
NUMPY_TYPES = {TensorType.FLOAT32: np.float32, TensorType.FLOAT16: np.float16, TensorType.INT32: np.int32}
NHWC_TO_NCHW_AXIS = {0: 0, 1: 2, 2: 3, 3: 1}


class Converter:
    """One TFLite subgraph to one ONNX graph. 4-D activations are NCHW here; constants stay numpy arrays until
    an op consumes them (so weights are re-laid-out once, in numpy)."""

    def __init__(self, model: "tflite.Model"):
        self.model = model
        self.graph = model.Subgraphs(0)
        self.nodes: list = []
        self.initializers: list = []
        self.constants: dict[int, np.ndarray] = {}
        self.names: dict[int, str] = {}
        self.rank: dict[int, int] = {}

    # -- tensors -----------------------------------------------------------------------------------------
    def tensor(self, i):
        return self.graph.Tensors(i)

    def shape(self, i):
        return [int(d) for d in self.tensor(i).ShapeAsNumpy()] if self.tensor(i).ShapeLength() else []

    def buffer(self, i):
        t = self.tensor(i)
        data = self.model.Buffers(t.Buffer()).DataAsNumpy()
        if isinstance(data, int) or data.size == 0:
            return None
        return np.frombuffer(data.tobytes(), NUMPY_TYPES[t.Type()]).reshape(self.shape(i))

    def name(self, i):
        return self.names.setdefault(i, f"t{i}")

    def fresh(self, base):
        return f"{base}_{len(self.nodes)}_{len(self.initializers)}"

    def weight(self, array, name):
        """An initializer; float16 ones get a Cast so the graph computes in float32 (and the file stays small)."""
        if array.dtype == np.float16:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name + "_f16"))
            self.nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=TensorProto.FLOAT))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_int64(self, values, base):
        return self.weight(np.asarray(values, np.int64), self.fresh(base))

    # -- ops ---------------------------------------------------------------------------------------------
    def convert(self):
        g = self.graph
        for k in range(g.TensorsLength()):
            b = self.buffer(k)
            if b is not None:
                self.constants[k] = b
        (inp,) = [g.Inputs(k) for k in range(g.InputsLength())]
        self.nodes.append(helper.make_node("Transpose", ["input"], [self.name(inp)], perm=[0, 3, 1, 2]))
        self.rank[inp] = 4
        for k in range(g.OperatorsLength()):
            op = g.Operators(k)
            code = self.model.OperatorCodes(op.OpcodeIndex())
            kind = OP_NAMES[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())]
            ins = [int(x) for x in op.InputsAsNumpy()]
            outs = [int(x) for x in op.OutputsAsNumpy()]
            handler = getattr(self, "op_" + kind.lower(), None)
            if handler is None:
                raise SystemExit(f"unsupported TFLite op {kind}")
            handler(op, ins, outs)
        outputs = []
        for k in range(g.OutputsLength()):
            i = g.Outputs(k)
            out_name = self.tensor(i).Name().decode()
            self.nodes.append(helper.make_node("Identity", [self.name(i)], [out_name]))
            outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, self.shape(i)))
        in_shape = self.shape(inp)
        graph = helper.make_graph(
            self.nodes,
            "graph",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
            outputs,
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="foldercnn")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model

    def activation(self, out, fused):
        """Apply a TFLite fused activation to a fresh name and return it under `out`'s name."""
        if fused == ActivationFunctionType.NONE:
            return
        raw = self.fresh("pre_act")
        self.nodes[-1].output[0] = raw
        if fused == ActivationFunctionType.RELU:
            self.nodes.append(helper.make_node("Relu", [raw], [self.name(out)]))
        elif fused == ActivationFunctionType.RELU6:
            lo, hi = self.weight(np.float32(0), self.fresh("zero")), self.weight(np.float32(6), self.fresh("six"))
            self.nodes.append(helper.make_node("Clip", [raw, lo, hi], [self.name(out)]))
        else:
            raise SystemExit(f"unsupported fused activation {fused}")

    def op_dequantize(self, op, ins, outs):
        if ins[0] not in self.constants:
            raise SystemExit("DEQUANTIZE of a non-constant tensor")
        self.constants[outs[0]] = self.constants[ins[0]]  # kept float16 until used; the Cast comes with it

    def same_pads(self, in_hw, kernel, strides, dilation):
        pads_begin, pads_end = [], []
        for size, k, s, d in zip(in_hw, kernel, strides, dilation):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            pads_begin.append(total // 2)
            pads_end.append(total - total // 2)
        return pads_begin + pads_end

    def conv(self, ins, outs, w, opts, group):
        bias = self.constants.get(ins[2]) if len(ins) > 2 and ins[2] >= 0 else None
        kernel = list(w.shape[2:])
        strides = [opts.StrideH(), opts.StrideW()]
        dilation = [opts.DilationHFactor(), opts.DilationWFactor()]
        in_hw = self.shape(ins[0])[1:3]
        pads = self.same_pads(in_hw, kernel, strides, dilation) if opts.Padding() == Padding.SAME else [0, 0, 0, 0]
        inputs = [self.name(ins[0]), self.weight(w, self.fresh("w"))]
        if bias is not None:
            inputs.append(self.weight(bias, self.fresh("b")))
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [self.name(outs[0])],
                kernel_shape=kernel,
                strides=strides,
                dilations=dilation,
                pads=pads,
                group=group,
            )
        )
        self.rank[outs[0]] = 4
        self.activation(outs[0], opts.FusedActivationFunction())

    def op_conv_2d(self, op, ins, outs):
        opts = tflite.Conv2DOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        w = self.constants[ins[1]].transpose(0, 3, 1, 2)  # OHWI -> OIHW
        self.conv(ins, outs, w, opts, group=1)

    def op_depthwise_conv_2d(self, op, ins, outs):
        opts = tflite.DepthwiseConv2DOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        channels = self.shape(ins[0])[3]
        w = self.constants[ins[1]].transpose(3, 0, 1, 2)  # 1HW(C*M) -> (C*M)1HW
        self.conv(ins, outs, w, opts, group=channels)

    def op_prelu(self, op, ins, outs):
        alpha = self.constants[ins[1]]
        alpha = alpha.reshape(-1, 1, 1) if self.rank.get(ins[0]) == 4 else alpha
        self.nodes.append(
            helper.make_node(
                "PRelu", [self.name(ins[0]), self.weight(alpha, self.fresh("alpha"))], [self.name(outs[0])]
            )
        )
        self.rank[outs[0]] = self.rank.get(ins[0], 0)

    def op_add(self, op, ins, outs):
        opts = tflite.AddOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        names = []
        for i in ins:
            if i in self.constants:
                c = self.constants[i]
                names.append(self.weight(c.reshape(-1, 1, 1) if self.rank.get(ins[0]) == 4 else c, self.fresh("c")))
            else:
                names.append(self.name(i))
        self.nodes.append(helper.make_node("Add", names, [self.name(outs[0])]))
        self.rank[outs[0]] = max(self.rank.get(i, 0) for i in ins)
        self.activation(outs[0], opts.FusedActivationFunction())

    def op_max_pool_2d(self, op, ins, outs):
        opts = tflite.Pool2DOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        kernel, strides = [opts.FilterHeight(), opts.FilterWidth()], [opts.StrideH(), opts.StrideW()]
        in_hw = self.shape(ins[0])[1:3]
        pads = self.same_pads(in_hw, kernel, strides, [1, 1]) if opts.Padding() == Padding.SAME else [0, 0, 0, 0]
        self.nodes.append(
            helper.make_node(
                "MaxPool", [self.name(ins[0])], [self.name(outs[0])], kernel_shape=kernel, strides=strides, pads=pads
            )
        )
        self.rank[outs[0]] = 4
        self.activation(outs[0], opts.FusedActivationFunction())

    def op_pad(self, op, ins, outs):
        p = self.constants[ins[1]].astype(np.int64)  # (4, 2) in NHWC
        order = [0, 3, 1, 2]
        pads = [int(p[a, 0]) for a in order] + [int(p[a, 1]) for a in order]
        self.nodes.append(
            helper.make_node("Pad", [self.name(ins[0]), self.const_int64(pads, "pads")], [self.name(outs[0])])
        )
        self.rank[outs[0]] = 4

    def op_resize_bilinear(self, op, ins, outs):
        opts = tflite.ResizeBilinearOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        h, w = (int(v) for v in self.constants[ins[1]])
        n, _, _, c = self.shape(ins[0])
        mode = "align_corners" if opts.AlignCorners() else "half_pixel" if opts.HalfPixelCenters() else "asymmetric"
        sizes = self.const_int64([n, c, h, w], "sizes")
        self.nodes.append(
            helper.make_node(
                "Resize",
                [self.name(ins[0]), "", "", sizes],
                [self.name(outs[0])],
                mode="linear",
                coordinate_transformation_mode=mode,
            )
        )
        self.rank[outs[0]] = 4

    def to_nhwc(self, i):
        if self.rank.get(i) != 4:
            return self.name(i)
        out = self.fresh("nhwc")
        self.nodes.append(helper.make_node("Transpose", [self.name(i)], [out], perm=[0, 2, 3, 1]))
        return out

    def op_reshape(self, op, ins, outs):
        shape = self.shape(outs[0])
        if len(shape) == 4:
            raise SystemExit("RESHAPE to 4-D is not handled")
        self.nodes.append(
            helper.make_node("Reshape", [self.to_nhwc(ins[0]), self.const_int64(shape, "shape")], [self.name(outs[0])])
        )
        self.rank[outs[0]] = len(shape)

    def op_concatenation(self, op, ins, outs):
        opts = tflite.ConcatenationOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        rank = self.rank.get(ins[0], len(self.shape(ins[0])))
        axis = opts.Axis() % len(self.shape(ins[0]))
        axis = NHWC_TO_NCHW_AXIS[axis] if rank == 4 and self.rank.get(ins[0]) == 4 else axis
        self.nodes.append(helper.make_node("Concat", [self.name(i) for i in ins], [self.name(outs[0])], axis=axis))
        self.rank[outs[0]] = self.rank.get(ins[0], 0)
        self.activation(outs[0], opts.FusedActivationFunction())

    def op_mean(self, op, ins, outs):
        opts = tflite.ReducerOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        axes = [int(a) for a in np.atleast_1d(self.constants[ins[1]])]
        if self.rank.get(ins[0]) == 4:
            axes = [NHWC_TO_NCHW_AXIS[a % 4] for a in axes]
        keep = int(opts.KeepDims())
        self.nodes.append(
            helper.make_node("ReduceMean", [self.name(ins[0])], [self.name(outs[0])], axes=axes, keepdims=keep)
        )
        if keep and self.rank.get(ins[0]) == 4:
            self.rank[outs[0]] = 4
        else:
            self.rank[outs[0]] = len(self.shape(outs[0]))
            if self.rank.get(ins[0]) == 4 and sorted(axes) != [2, 3]:
                raise SystemExit("MEAN over other axes than H, W is not handled")

    def op_fully_connected(self, op, ins, outs):
        opts = tflite.FullyConnectedOptions()
        opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
        w = self.constants[ins[1]]
        x = self.to_nhwc(ins[0])
        flat = self.fresh("flat")
        self.nodes.append(helper.make_node("Reshape", [x, self.const_int64([-1, w.shape[1]], "fc_shape")], [flat]))
        inputs = [flat, self.weight(w, self.fresh("fc_w"))]
        if len(ins) > 2 and ins[2] >= 0:
            inputs.append(self.weight(self.constants[ins[2]], self.fresh("fc_b")))
        self.nodes.append(helper.make_node("Gemm", inputs, [self.name(outs[0])], transB=1))
        self.rank[outs[0]] = 2
        self.activation(outs[0], opts.FusedActivationFunction())

    def op_logistic(self, op, ins, outs):
        self.nodes.append(helper.make_node("Sigmoid", [self.name(ins[0])], [self.name(outs[0])]))
        self.rank[outs[0]] = self.rank.get(ins[0], 0)


def check(tflite_path: Path, onnx_model, inputs: np.ndarray) -> float:
    """The largest absolute difference between LiteRT's and onnxruntime's outputs over `inputs` (N, H, W, 3)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(tflite_path))
    interp.allocate_tensors()
    ins, outs = interp.get_input_details(), interp.get_output_details()
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = 0.0
    for x in inputs:
        interp.set_tensor(ins[0]["index"], x[None])
        interp.invoke()
        ours = dict(zip(names, session.run(None, {"input": x[None]})))
        for o in outs:
            theirs = interp.get_tensor(o["index"])
            worst = max(worst, float(np.abs(theirs - ours[o["name"]].reshape(theirs.shape)).max()))
    return worst


def check_inputs(size: int, photos: Path | None, n: int = 24) -> np.ndarray:
    """Inputs in [0, 1] as MediaPipe feeds them: noise, flat colours, and real photos when given."""
    rng = np.random.default_rng(0)
    xs = [rng.random((size, size, 3), dtype=np.float32) for _ in range(4)]
    xs += [np.full((size, size, 3), v, np.float32) for v in (0.0, 0.5, 1.0)]
    if photos is not None:
        from PIL import Image

        files = sorted(p for p in photos.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
        for p in files[:: max(1, len(files) // n)][:n]:
            im = Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)
            xs.append(np.asarray(im, np.float32) / 255)
    return np.stack(xs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, help="a folder of real photos to check the conversion on too")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    import mediapipe

    root = Path(mediapipe.__file__).parent
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, rel in MODELS.items():
        src = root / rel
        model = Converter(tflite.Model.GetRootAsModel(src.read_bytes(), 0)).convert()
        size = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        worst = check(src, model, check_inputs(size, args.photos))
        status = "ok" if worst <= TOLERANCE else "TOO FAR"
        print(f"{name}: {len(model.graph.node)} ONNX nodes, largest difference from LiteRT {worst:.2e} ({status})")
        if worst > TOLERANCE:
            sys.exit(f"{name}: the conversion differs from the original by {worst:.2e} > {TOLERANCE}")
        path = args.out / f"{name}.onnx"
        onnx.save(model, path)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        lines.append(f"- {name}.onnx: from mediapipe=={mediapipe.__version__} `mediapipe/{rel}` (sha256 {digest})")
    licence = root.parent / f"mediapipe-{mediapipe.__version__}.dist-info" / "LICENSE"
    if licence.exists():
        shutil.copyfile(licence, args.out / "LICENSE")
    (args.out / "NOTICE").write_text(NOTICE.format(files="\n".join(lines)))
    print(f"wrote {args.out}")


NOTICE = """MediaPipe Hands models, converted to ONNX

These files are MediaPipe's palm-detection and hand-landmark models, by Google, licensed under the Apache
License 2.0 (LICENSE beside this file). They were converted from the TensorFlow Lite files that ship inside the
`mediapipe` wheel on PyPI by `scripts/make_hand_models.py` in the foldercnn repository, which also checks each
converted file against the original run by LiteRT. The graphs compute the same functions; only the file format and
the layout of the weights changed.

{files}

Source: https://github.com/google-ai-edge/mediapipe (mediapipe/modules/palm_detection, mediapipe/modules/hand_landmark)
"""


if __name__ == "__main__":
    main()
