"""`foldercnn export`: every model family to ONNX with the preprocessing inside, the same numbers as PyTorch,
a torch-free predictor, `.onnx` files through predict and serve, and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import foldercnn
from foldercnn.deploy.export import export_model, export_onnx
from foldercnn.deploy.onnx_predict import OnnxClassifier
from foldercnn.models.file import save_model
from foldercnn.models.preprocess import default_preprocessing
from foldercnn.models.registry import create_model
from testkit import run_cli

pytestmark = pytest.mark.slow  # real exports and subprocesses: not in the quick loop
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FAMILIES = {  # architecture, arguments, image size, mean/std, tta
    "tutorial-cnn": ("tutorial-cnn", {"image_size": 48}, 48, (0, 0, 0), (1, 1, 1), False),
    "fast-cnn-tta": ("fast-cnn", {}, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True),
    "effnet-lite0": ("effnet-lite0", {}, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
}


def model_file(tmp_path, family):
    """A model file of the family with random weights (and non-trivial batch-norm statistics)."""
    arch, args, size, mean, std, tta = FAMILIES[family]
    torch.manual_seed(0)
    model = create_model(arch, 3, **args)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = {
        "architecture": arch,
        "arch_args": args,
        "classes": ["rock", "paper", "scissors"],
        "image_size": size,
        "preprocessing": default_preprocessing(mean, std),
        "tta": tta,
        "calibration": {"temperature": 0.7, "uncertain_below": 0.6},
    }
    return save_model(tmp_path / f"{family}.safetensors", model, meta)


def images(size, n=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_with_the_same_numbers(tmp_path, family):
    path = model_file(tmp_path, family)
    clf = foldercnn.load(path)
    out = export_onnx(clf.model, clf.metadata, tmp_path / f"{family}.onnx")
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert not list(tmp_path.glob("*.data"))  # one self-contained file
    x = images(clf.image_size)
    runtime = OnnxClassifier(out)
    expected = clf.probabilities(x)
    got = runtime.probabilities(x)
    assert np.abs(got - expected).max() < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    for n in (1, 5):  # the batch size is dynamic
        assert runtime.probabilities(x[:n]).shape == (n, 3)


def test_metadata_round_trip(tmp_path):
    path = model_file(tmp_path, "fast-cnn-tta")
    out = export_onnx(*(lambda c: (c.model, c.metadata))(foldercnn.load(path)), tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["classes"]) == ["rock", "paper", "scissors"] and props["image_size"] == "32"
    assert float(props["temperature"]) == 0.7 and float(props["uncertain_below"]) == 0.6
    assert json.loads(props["tta"]) is True and json.loads(props["preprocessing"])["std"] == [0.25] * 3
    assert props["foldercnn_version"] == foldercnn.__version__
    runtime = OnnxClassifier(out)
    assert runtime.classes == ["rock", "paper", "scissors"] and runtime.image_size == 32


@pytest.fixture(scope="module")
def exported(trained_model, tmp_path_factory):
    """The trained shapes model exported with an int8 copy, calibrated on its training folder."""
    out = tmp_path_factory.mktemp("export") / "shapes.onnx"
    lines = []
    paths = export_model(trained_model.model_path, out, int8=True, log=lines.append)
    return paths, lines


def test_export_reports_parity_and_the_int8_cost(exported, trained_model, shapes_dirs):
    (fp32, int8), lines = exported
    text = "\n".join(lines)
    assert "same top-1 for 120 of 120" in text and "int8" in text and "faster" in text
    assert "same flag for 120 of 120" in text  # the unfamiliarity output agrees with PyTorch's
    files = sorted(shapes_dirs[1].rglob("*.png"))
    torch_preds = foldercnn.load(trained_model.model_path).predict_many(files)
    for path, least in ((fp32, 1.0), (int8, 0.9)):
        preds = OnnxClassifier(path).predict_many(files)
        same = np.mean([a.label == b.label for a, b in zip(preds, torch_preds)])
        assert same >= least, (path, same)
    onnx.checker.check_model(onnx.load(str(int8)))


BLOCK_TORCH = """
import json, sys
class Block:
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('torch is blocked in this test')
sys.meta_path.insert(0, Block())
from foldercnn.cli import main
code = main(['predict', sys.argv[1], sys.argv[2], '--json'])
assert 'torch' not in sys.modules
"""


def test_the_onnx_predictor_needs_no_torch(exported, trained_model, shapes_dirs):
    (fp32, _), _ = exported
    r = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, str(fp32), str(shapes_dirs[1])], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    torch_rows = json.loads(run_cli("predict", trained_model.model_path, shapes_dirs[1], "--json").stdout)
    assert [row["label"] for row in rows] == [row["label"] for row in torch_rows] and len(rows) == 45
    for a, b in zip(rows, torch_rows):
        assert abs(a["probability"] - b["probability"]) < 1e-4 and a["uncertain"] == b["uncertain"]
        assert a["unfamiliar"] == b["unfamiliar"] and abs(a["unfamiliarity"] - b["unfamiliarity"]) < 1e-3


def test_serve_answers_from_an_onnx_file(exported, shapes_dirs):
    from fastapi.testclient import TestClient

    from foldercnn.deploy.serve import create_app

    (fp32, _), _ = exported
    image = next(shapes_dirs[1].rglob("*.png"))
    with TestClient(create_app(fp32)) as client:
        r = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))])
        assert r.status_code == 200
        row = r.json()[0]
        assert row["label"] == OnnxClassifier(fp32).predict(image).label and "uncertain" in row
        assert client.get("/model").json()["format"] == "onnx"


def test_clear_errors(tmp_path, trained_model, shapes_dirs):
    r = run_cli("export", trained_model.model_path, "--format", "tflite", "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "unknown export format 'tflite'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("export", trained_model.model_path, "--out", tmp_path / "m.txt")
    assert r.returncode == 2 and "must end in .onnx" in r.stderr
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    r = run_cli("predict", tmp_path / "garbage.onnx", shapes_dirs[1])
    assert r.returncode == 2 and "not a readable ONNX model" in r.stderr and "Traceback" not in r.stderr
    # a valid ONNX file that foldercnn did not write
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "other.onnx"))
    r = run_cli("predict", tmp_path / "other.onnx", shapes_dirs[1])
    assert r.returncode == 2 and "not one exported by foldercnn" in r.stderr
    r = run_cli("export", tmp_path / "nope.safetensors")
    assert r.returncode == 2 and "model file not found" in r.stderr
