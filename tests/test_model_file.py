"""The model file: round trip, metadata, atomic write, bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

import foldercnn
from foldercnn import FolderCNNError
from foldercnn.models.file import read_metadata, save_model
from foldercnn.models.preprocess import default_preprocessing
from foldercnn.models.registry import create_model


def test_round_trip_gives_identical_predictions(trained_model, shapes_dirs):
    clf = foldercnn.load(trained_model.model_path)
    files = sorted(shapes_dirs[1].rglob("*.png"))[:10]
    first = [p.probabilities for p in clf.predict_many(files)]
    # rebuild from the file alone, in a fresh object, and compare
    again = foldercnn.load(trained_model.model_path)
    assert [p.probabilities for p in again.predict_many(files)] == first
    single = again.predict(files[0])
    assert single.label in clf.classes and abs(sum(single.probabilities.values()) - 1) < 1e-5
    assert single.probabilities == pytest.approx(first[0])


def test_metadata_makes_the_file_self_contained(trained_model):
    meta = read_metadata(trained_model.model_path)
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["image_size"] == 32 and meta["architecture"] == "fast-cnn"
    assert meta["format_version"] == 1 and meta["recipe"]["name"] == "fast"
    assert {"rescale", "mean", "std", "resize"} <= set(meta["preprocessing"])
    best = trained_model.history[trained_model.best_epoch - 1]
    assert (
        meta["metrics"]["val_accuracy"] == best["val_accuracy"] and meta["metrics"]["epoch"] == trained_model.best_epoch
    )
    assert meta["metrics"]["n_train"] + meta["metrics"]["n_val"] == 120


def test_atomic_write_leaves_no_temp_files(tmp_path):
    model = create_model("fast-cnn", num_classes=2)
    meta = {
        "architecture": "fast-cnn",
        "arch_args": {},
        "classes": ["a", "b"],
        "image_size": 32,
        "preprocessing": default_preprocessing(),
    }
    save_model(tmp_path / "m.safetensors", model, meta)
    save_model(tmp_path / "m.safetensors", model, meta)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert foldercnn.load(tmp_path / "m.safetensors").classes == ["a", "b"]


def test_no_pickle_in_model_file(trained_model):
    """Every byte is accounted for: an 8-byte length, a JSON header, then exactly the raw tensor bytes it
    describes, back to back. There is no room for anything else (a pickle included)."""
    data = trained_model.model_path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    json.loads(header.pop("__metadata__")["foldercnn"])
    ranges = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert 8 + header_len + ranges[-1][1] == len(data)


@pytest.mark.parametrize("kind", ["missing", "garbage", "no_metadata", "wrong_weights"])
def test_bad_model_files(tmp_path, kind):
    path = tmp_path / "m.safetensors"
    if kind == "garbage":
        path.write_bytes(b"definitely not a model")
    elif kind == "no_metadata":
        save_file({"x": torch.zeros(2)}, str(path))
    elif kind == "wrong_weights":
        meta = {
            "format_version": 1,
            "architecture": "fast-cnn",
            "arch_args": {},
            "classes": ["a", "b"],
            "image_size": 32,
            "preprocessing": default_preprocessing(),
        }
        save_file({"x": torch.zeros(2)}, str(path), metadata={"foldercnn": json.dumps(meta)})
    with pytest.raises(FolderCNNError):
        foldercnn.load(path)


# ---- a corpus of tampered model files: each refused by every command, quickly, without a big allocation ----


def _split(data):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header, body):
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def _with_meta(data, change):
    header, body = _split(data)
    meta = json.loads(header["__metadata__"]["foldercnn"])
    change(meta)
    header["__metadata__"]["foldercnn"] = json.dumps(meta)
    return _join(header, body)


def _with_header(data, change):
    header, body = _split(data)
    change(header)
    return _join(header, body)


def _swap_shapes(h):
    a, b = "0.0.weight", "1.0.weight"  # two conv weights: same dtype, different shapes
    h[a]["shape"], h[b]["shape"] = h[b]["shape"], h[a]["shape"]


def _huge_tensor(h):
    h["0.0.weight"]["shape"] = [100000, 100000, 3, 3]


def _nan_in_unfamiliar(d):
    header, body = _split(d)
    start = header["unfamiliar.means"]["data_offsets"][0]
    body = body[:start] + b"\x00\x00\xc0\x7f" + body[start + 4 :]  # float32 NaN
    return _join(header, body)


def _nan_in_tensor(d, name):
    header, body = _split(d)
    start = header[name]["data_offsets"][0]
    body = body[:start] + b"\x00\x00\xc0\x7f" + body[start + 4 :]  # float32 NaN in its first value
    return _join(header, body)


def _overlapping(h):
    first = min(h[k]["data_offsets"][0] for k in h if k != "__metadata__")
    big = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0])
    size = h[big]["data_offsets"][1] - h[big]["data_offsets"][0]
    h[big]["data_offsets"] = [first, first + size]


TAMPERED = {  # name -> (how to break a good file, what the error must say)
    "huge widths": (
        lambda d: _with_meta(d, lambda m: m["arch_args"].update(widths=[100000, 100000, 100000, 100000])),
        "widths",
    ),
    "unknown argument": (lambda d: _with_meta(d, lambda m: m["arch_args"].update(evil=1)), "no argument evil"),
    "huge image size": (lambda d: _with_meta(d, lambda m: m.update(image_size=10**9)), "between 8 and 1024"),
    "empty preprocessing": (lambda d: _with_meta(d, lambda m: m.update(preprocessing={})), "preprocessing mean"),
    "unknown fit": (
        lambda d: _with_meta(d, lambda m: m["preprocessing"].update(fit="stretch")),
        "neither 'squash' nor 'letterbox'",
    ),
    "classes as a string": (lambda d: _with_meta(d, lambda m: m.update(classes="abc")), "classes must be a list"),
    "repeated classes": (lambda d: _with_meta(d, lambda m: m.update(classes=["a", "a", "b"])), "class names repeat"),
    "empty class name": (lambda d: _with_meta(d, lambda m: m.update(classes=["", "b", "c"])), "non-empty string"),
    "unknown architecture": (lambda d: _with_meta(d, lambda m: m.update(architecture="resnet-9000")), "unknown model"),
    "negative temperature": (lambda d: _with_meta(d, lambda m: m["calibration"].update(temperature=-1)), "temperature"),
    "newer format": (lambda d: _with_meta(d, lambda m: m.update(format_version=99)), "newer foldercnn"),
    "class count differs": (lambda d: _with_meta(d, lambda m: m.update(classes=["a", "b"])), "needs [2, 192]"),
    "truncated": (lambda d: d[: len(d) // 2], "outside the file"),
    "swapped shapes": (lambda d: _with_header(d, _swap_shapes), "bytes for shape"),
    "extra tensor": (
        lambda d: _with_header(d, lambda h: h.update(extra={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})),
        "unexpected: extra",
    ),
    "missing tensor": (lambda d: _with_header(d, lambda h: h.pop("0.0.weight")), "missing: 0.0.weight"),
    "huge declared tensor": (lambda d: _with_header(d, _huge_tensor), "bytes for shape"),
    "overlapping tensors": (lambda d: _with_header(d, _overlapping), "share bytes"),
    "unfamiliar tensors without their section": (
        lambda d: _with_meta(d, lambda m: m.pop("unfamiliar")),
        "unexpected: unfamiliar.",
    ),
    "unfamiliar tensor missing": (
        lambda d: _with_header(d, lambda h: h.pop("unfamiliar.means")),
        "missing: unfamiliar.means",
    ),
    "unfamiliar rank differs": (
        lambda d: _with_meta(d, lambda m: m["unfamiliar"].update(rank=10, inv_rest=1.0)),
        "unfamiliar.basis has shape",
    ),
    "unfamiliar feature width": (
        lambda d: _with_meta(d, lambda m: m["unfamiliar"].update(feature_dim=100, rank=100)),
        "differs from architecture",
    ),
    "unfamiliar threshold": (
        lambda d: _with_meta(d, lambda m: m["unfamiliar"].update(threshold=-1)),
        "unfamiliar threshold",
    ),
    "unfamiliar NaN": (_nan_in_unfamiliar, "NaN"),
    "NaN weight": (lambda d: _nan_in_tensor(d, "0.0.weight"), "weights hold NaN"),
    "header length lies": (lambda d: (2**40).to_bytes(8, "little") + d[8:], "header claims"),
    "not json": (
        lambda d: d[:8] + b"\xff" * int.from_bytes(d[:8], "little") + d[8 + int.from_bytes(d[:8], "little") :],
        "unreadable header",
    ),
}


@pytest.fixture(scope="module")
def tampered(trained_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tampered")
    good = trained_model.model_path.read_bytes()
    paths = {}
    for i, (name, (breaks, _)) in enumerate(TAMPERED.items()):
        paths[name] = folder / f"{i:02d}.safetensors"
        paths[name].write_bytes(breaks(good))
    return paths


LOAD_PROBE = """
import json, sys, time
import foldercnn
import foldercnn.models.inference, foldercnn.models.registry  # imported up front: not part of the timing
def hwm_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
out = {}
for path in sys.argv[1:]:
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before, t = hwm_kb(), time.perf_counter()
    try:
        foldercnn.load(path)
        out[path] = ["loaded", 0, 0]
    except foldercnn.FolderCNNError as e:
        out[path] = [str(e), time.perf_counter() - t, hwm_kb() - before]
print(json.dumps(out))
"""


def test_tampered_files_are_refused_quickly_without_allocating(tampered):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", LOAD_PROBE, *map(str, tampered.values())], capture_output=True, text=True, timeout=300
    )
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for name, path in tampered.items():
        message, seconds, grew_kb = results[str(path)]
        assert TAMPERED[name][1] in message, (name, message)
        assert seconds < 1.0, (name, seconds)
        assert grew_kb * 1024 <= path.stat().st_size + (2 << 20), (name, grew_kb)  # file size + 2 MB slack


MAIN_PROBE = """
import contextlib, io, json, sys, traceback
from foldercnn.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:
            code, err = "traceback", io.StringIO(traceback.format_exc())
    out.append([argv, code, err.getvalue()])
print(json.dumps(out))
"""


def test_every_command_that_loads_a_model_refuses_each_tampered_file(tampered, shapes_dirs, tmp_path):
    import subprocess
    import sys

    image = next(shapes_dirs[1].rglob("*.png"))
    argvs = []
    for path in tampered.values():
        argvs += [
            ["predict", str(path), str(image)],
            ["evaluate", str(path), str(shapes_dirs[1])],
            ["serve", str(path), "--port", "0"],
            ["report", str(tmp_path), "--model", str(path)],
        ]
    r = subprocess.run(
        [sys.executable, "-c", MAIN_PROBE, json.dumps(argvs)], capture_output=True, text=True, timeout=600
    )
    for argv, code, err in json.loads(r.stdout.strip().splitlines()[-1]):
        assert code == 2 and err.startswith("foldercnn: error: ") and len(err.strip().splitlines()) == 1, (
            argv,
            code,
            err,
        )


def _with_tensor(path, out, name, change):
    """A copy of a model file with one tensor changed (its metadata kept as it is)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_finite_weights_that_cannot_give_finite_answers_are_refused(trained_model, shapes_dirs, tmp_path, cli):
    """3e38 passes the NaN check and overflows to NaN in one layer: the file is refused, and no command prints a
    NaN (`predict --json` would be invalid JSON)."""
    from safetensors import safe_open

    with safe_open(str(trained_model.model_path), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("weight") and f.get_tensor(k).ndim == 4)
    bad = _with_tensor(trained_model.model_path, tmp_path / "huge.safetensors", name, lambda t: t.fill_(3e38))
    image = next(shapes_dirs[1].rglob("*.png"))
    for args in (("predict", bad, image, "--json"), ("evaluate", bad, shapes_dirs[1])):
        r = cli(*args)
        assert r.returncode == 2 and "cannot give finite answers" in r.stderr and "Traceback" not in r.stderr
        assert "NaN" not in r.stdout


def test_a_hand_model_whose_features_divide_by_zero_is_refused(tmp_path, cli):
    from testkit import untrained_hand_model

    good = untrained_hand_model(tmp_path / "m.safetensors")
    bad = _with_tensor(good, tmp_path / "zero.safetensors", "feature_std", lambda t: t.zero_())
    r = cli("predict", bad, tmp_path / "any.png")
    assert r.returncode == 2 and "feature_std" in r.stderr and "Traceback" not in r.stderr


def test_a_prediction_is_never_a_nan_row():
    from foldercnn.errors import FolderCNNError
    from foldercnn.models.prediction import from_probabilities

    with pytest.raises(FolderCNNError, match="no finite answer"):
        from_probabilities(["a", "b"], [float("nan"), 0.5], 0.8, path="x.png")
