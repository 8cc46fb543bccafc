"""Near-duplicates: planted copies found, distinct images never paired, groups kept on one side of the split."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from foldercnn.data import duplicates as dup
from foldercnn.data.folders import group_split, load_folder, scan_folder
from testkit import run_cli


def scene(rng, size=120):
    """A distinct photo-like image: smooth random colour blobs."""
    noise = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))


def edited(im, edit, rng):
    if edit == "resize":
        return im.resize((im.width // 2, im.height // 2), Image.BILINEAR)
    if edit == "crop":
        d = int(0.05 * im.width)
        return im.crop(
            tuple(
                int(v)
                for v in (
                    rng.integers(0, d),
                    rng.integers(0, d),
                    im.width - rng.integers(0, d),
                    im.height - rng.integers(0, d),
                )
            )
        )
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=40)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def folder_with_copies(tmp_path_factory):
    """40 distinct images per class in two classes, plus 3 edited copies of 6 of them."""
    root = tmp_path_factory.mktemp("dups")
    rng = np.random.default_rng(0)
    planted = {}
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(40):
            im = scene(rng)
            im.save(root / c / f"{c}{i:02d}.png")
            if i < 3:
                for edit in ("resize", "crop", "jpeg"):
                    name = f"{c}{i:02d}-{edit}.jpg"
                    edited(im, edit, rng).save(root / c / name, quality=95)
                    planted[name] = f"{c}{i:02d}.png"
    return root, planted


def test_planted_copies_are_grouped_with_their_source_and_nothing_else(folder_with_copies):
    root, planted = folder_with_copies
    data = load_folder(scan_folder(root), 96)
    groups = [{data.paths[i].name for i in g} for g in dup.groups_of(dup.near_duplicate_groups(data.images))]
    expected = {}
    for copy, source in planted.items():
        expected.setdefault(source, {source}).add(copy)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected.values()))


def test_identical_files_are_grouped_by_their_bytes(tmp_path):
    rng = np.random.default_rng(1)
    images = np.stack([np.array(scene(rng, 64)) for _ in range(3)])
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(b"same" if i else b"other")
    ids = dup.near_duplicate_groups(images, paths)
    assert ids[1] == ids[2] != ids[0]


def test_matches_against_finds_leaks_only(folder_with_copies):
    root, planted = folder_with_copies
    data = load_folder(scan_folder(root), 96)
    is_copy = torch.tensor([p.name in planted for p in data.paths])
    originals, copies = torch.nonzero(~is_copy).flatten(), torch.nonzero(is_copy).flatten()
    rng = np.random.default_rng(7)
    fresh = torch.from_numpy(np.stack([np.array(scene(rng, 96)) for _ in range(5)]))
    queries = torch.cat([data.images[copies], fresh])
    found = dup.matches_against(queries, data.images[originals])
    assert [i for i, _, _ in found] == list(range(len(copies)))
    for i, j, _ in found:
        assert data.paths[originals[j]].name == planted[data.paths[copies[i]].name]


def test_group_split_never_puts_a_group_on_both_sides():
    labels = torch.tensor([0] * 200 + [1] * 200)
    groups = torch.arange(400) // 5  # bursts of 5, never mixing classes
    for seed in range(5):
        train, val, cut = group_split(labels, groups, 0.2, seed)
        assert cut == []
        assert set(groups[train].tolist()).isdisjoint(groups[val].tolist())
        assert len(train) + len(val) == 400
        for c in (0, 1):
            assert 30 <= int((labels[val] == c).sum()) <= 60  # about 20% of each class
    assert torch.equal(group_split(labels, groups, 0.2, 3)[1], group_split(labels, groups, 0.2, 3)[1])


def test_group_split_cuts_a_long_sequence_into_runs_of_consecutive_images():
    labels = torch.tensor([0] * 100 + [1] * 100)
    groups = torch.tensor([0] * 100 + [1] * 100)  # each class is one rendered sequence
    train, val, cut = group_split(labels, groups, 0.2, 0)
    assert cut == [0, 1]
    for c in (0, 1):
        mine = val[labels[val] == c].tolist()
        assert 15 <= len(mine) <= 30
        runs = [mine[k : k + 5] for k in range(0, len(mine), 5)]  # runs of 0.25 * 20% * 100 = 5 images
        assert all(r == list(range(r[0], r[0] + 5)) and r[0] % 5 == 0 for r in runs)


def test_inspect_reports_groups_and_leaks(folder_with_copies, tmp_path):
    root, planted = folder_with_copies
    test = tmp_path / "test" / "a"
    test.mkdir(parents=True)
    (test / "leaked.jpg").write_bytes((root / "a" / "a00-jpeg.jpg").read_bytes())
    scene(np.random.default_rng(99)).save(test / "new.png")
    r = run_cli("inspect", root, "--against", tmp_path / "test")
    assert r.returncode == 0, r.stderr
    assert "near-duplicates: 6 groups, 24 images" in r.stdout
    assert "leaks: 1 image(s)" in r.stdout and "leaked.jpg" in r.stdout and "new.png" not in r.stdout
