"""The model file: round trip, metadata, atomic write, bad files."""
import json

import pytest
import torch
from safetensors.torch import save_file

import foldercnn
from foldercnn import FolderCNNError
from foldercnn.models.file import read_metadata, save_model
from foldercnn.models.registry import create_model
from foldercnn.models.preprocess import default_preprocessing


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
    assert 0 <= meta["metrics"]["val_accuracy"] <= 1


def test_atomic_write_leaves_no_temp_files(tmp_path):
    model = create_model("fast-cnn", num_classes=2)
    meta = {"architecture": "fast-cnn", "arch_args": {}, "classes": ["a", "b"], "image_size": 32,
            "preprocessing": default_preprocessing()}
    save_model(tmp_path / "m.safetensors", model, meta)
    save_model(tmp_path / "m.safetensors", model, meta)  # overwrite in place
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert foldercnn.load(tmp_path / "m.safetensors").classes == ["a", "b"]


def test_no_pickle_in_model_file(trained_model):
    data = trained_model.model_path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_len])
    assert "__metadata__" in header and b"\x80\x04\x95" not in data[:8 + header_len]


@pytest.mark.parametrize("kind", ["missing", "garbage", "no_metadata", "wrong_weights"])
def test_bad_model_files(tmp_path, kind):
    path = tmp_path / "m.safetensors"
    if kind == "garbage":
        path.write_bytes(b"definitely not a model")
    elif kind == "no_metadata":
        save_file({"x": torch.zeros(2)}, str(path))
    elif kind == "wrong_weights":
        meta = {"format_version": 1, "architecture": "fast-cnn", "arch_args": {}, "classes": ["a", "b"],
                "image_size": 32, "preprocessing": default_preprocessing()}
        save_file({"x": torch.zeros(2)}, str(path), metadata={"foldercnn": json.dumps(meta)})
    with pytest.raises(FolderCNNError):
        foldercnn.load(path)
