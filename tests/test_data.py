"""Scanning labelled folders: order, skips, and a clear error for every bad layout."""

import pytest
import torch
from PIL import Image

from foldercnn import FolderCNNError
from foldercnn.data.folders import load_folder, natural_key, scan_folder, stratified_split
from foldercnn.training.job import train_folder
from foldercnn.training.options import TrainOptions
from foldercnn.training.prepare import prepare_data
from foldercnn.training.recipes import get_recipe


def img(path, colour=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)
    return path


def test_natural_sort_of_classes_and_files(tmp_path):
    for c in ("10", "2", "b", "A"):
        for f in ("img10.png", "img9.png", "img1.png"):
            img(tmp_path / c / f)
    folder = scan_folder(tmp_path)
    assert folder.classes == ["2", "10", "A", "b"]
    assert [p.name for p in folder.files[:3]] == ["img1.png", "img9.png", "img10.png"]
    assert folder.counts() == {"2": 3, "10": 3, "A": 3, "b": 3}


def test_subfolders_included_hidden_and_non_images_reported(tmp_path):
    img(tmp_path / "cat" / "a.png")
    img(tmp_path / "cat" / "more" / "b.jpg")
    img(tmp_path / "dog" / "c.png")
    (tmp_path / "dog" / ".DS_Store").write_bytes(b"\0\0")
    (tmp_path / "dog" / "notes.txt").write_text("hi")
    img(tmp_path / ".hidden_class" / "x.png")
    folder = scan_folder(tmp_path)
    assert folder.classes == ["cat", "dog"]
    assert len(folder.files) == 3
    reasons = {p.name: r for p, r in folder.skipped}
    assert reasons[".DS_Store"] == "hidden file"
    assert "not an image" in reasons["notes.txt"]


def test_unreadable_images_skipped_with_reason(tmp_path):
    img(tmp_path / "a" / "good.png")
    img(tmp_path / "a" / "good2.png")
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "fake.jpg").write_text("not really a jpeg")
    img(tmp_path / "b" / "good.png")
    data = load_folder(scan_folder(tmp_path), 8)
    assert len(data) == 3 and data.images.shape == (3, 8, 8, 3) and data.images.dtype == torch.uint8
    assert {p.name for p, _ in data.skipped} == {"empty.png", "fake.jpg"}


@pytest.mark.parametrize(
    "layout,message",
    [
        ("missing", "folder not found"),
        ("file", "not a folder"),
        ("empty", "no class folders"),
        ("loose", "put each class in its own sub-folder"),
        ("one", "at least 2"),
        ("empty_class", "has no images"),
    ],
)
def test_bad_layouts(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_text("x")
    elif layout == "empty":
        root.mkdir()
    elif layout == "loose":
        img(root / "a.png")
    elif layout == "one":
        img(root / "only" / "a.png")
    elif layout == "empty_class":
        img(root / "a" / "x.png")
        (root / "b").mkdir()
    with pytest.raises(FolderCNNError, match=message):
        scan_folder(root)


def test_class_with_only_broken_images_is_an_error(tmp_path):
    img(tmp_path / "a" / "x.png")
    (tmp_path / "b" / "x.png").parent.mkdir()
    (tmp_path / "b" / "x.png").write_text("broken")
    with pytest.raises(FolderCNNError, match="class 'b'.*no usable images"):
        load_folder(scan_folder(tmp_path), 8)


def test_validation_classes_must_match(tmp_path):
    for c in ("a", "b"):
        img(tmp_path / "train" / c / "x.png")
    for c in ("a", "c"):
        img(tmp_path / "val" / c / "x.png")
    with pytest.raises(FolderCNNError, match="do not match.*missing b.*extra c"):
        prepare_data(
            tmp_path / "train", get_recipe("fast"), TrainOptions(val_dir=str(tmp_path / "val")), events=lambda *a: None
        )


def test_never_writes_inside_data_folder(tmp_path):
    for c in ("a", "b"):
        img(tmp_path / "data" / c / "x.png")
    with pytest.raises(FolderCNNError, match="never writes into your data"):
        train_folder(tmp_path / "data", tmp_path / "data" / "run", log=lambda *a: None)


def test_stratified_split_is_seeded_and_keeps_proportions():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    tr, va = stratified_split(labels, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80 and not set(tr.tolist()) & set(va.tolist())
    assert torch.bincount(labels[va]).tolist() == [10, 6, 4]
    assert torch.equal(va, stratified_split(labels, 0.2, seed=3)[1])
    assert not torch.equal(va, stratified_split(labels, 0.2, seed=4)[1])


def test_natural_key():
    assert sorted(["x10", "x2", "X1"], key=natural_key) == ["X1", "x2", "x10"]


def test_broken_symlink_is_skipped_not_a_crash(tmp_path):
    img(tmp_path / "a" / "x.png")
    img(tmp_path / "b" / "y.png")
    (tmp_path / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    data = load_folder(scan_folder(tmp_path), 8)
    assert len(data) == 2 and [(p.name, r) for p, r in data.skipped] == [("gone.png", "file not found")]
