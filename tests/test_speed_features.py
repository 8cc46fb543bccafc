"""Decode cache, time budget, precision fallback, EMA and flip TTA."""

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import foldercnn
from foldercnn import runtime
from foldercnn.data.folders import decode_cached, scan_folder
from foldercnn.errors import OptionError
from foldercnn.models.registry import create_model
from foldercnn.models.tta import predict_logits
from foldercnn.training.loop import WeightEMA, lr_factor
from testkit import make_shapes


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDERCNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_hit_returns_same_pixels(tmp_path, cache_dir):
    root = make_shapes(tmp_path / "d", per_class=5)
    files = scan_folder(root).files
    a, good_a, bad_a, hit_a = decode_cached(files, 16, root)
    b, good_b, bad_b, hit_b = decode_cached(files, 16, root)
    assert (hit_a, hit_b) == (False, True)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and good_a == good_b and bad_a == bad_b
    assert len(list((cache_dir / "decoded").glob("*.npy"))) == 1
    _, _, _, hit_other_size = decode_cached(files, 20, root)
    assert hit_other_size is False


def test_readahead_of_a_cached_set_reads_the_same_pixels(tmp_path, cache_dir):
    """A memory-mapped set asks the kernel for its rows ahead (runs of consecutive rows as one range); the
    pixels taken are those of the decode, by positions, slices and subsets alike."""
    from foldercnn.data import cache
    from foldercnn.data.folders import load_folder

    assert cache._runs([7, 3, 4, 5, 9, 8, 3]) == [(3, 3), (7, 3)] and cache._runs(range(2, 6)) == [(2, 4)]
    root = make_shapes(tmp_path / "d", per_class=6)
    load_folder(scan_folder(root), 16)  # fills the cache
    data = load_folder(scan_folder(root), 16)
    assert data.readahead is not None and data.readahead.row_bytes == 16 * 16 * 3
    in_ram = data.images.clone()
    idx = torch.tensor([5, 0, 11, 12])
    data.prefetch(idx)
    assert torch.equal(data.take(idx), in_ram[idx]) and torch.equal(data.take(slice(2, 9)), in_ram[2:9])
    sub = data.subset(torch.tensor([3, 4, 10, 1]))
    sub.prefetch(torch.tensor([0, 2]))
    assert torch.equal(sub.take(slice(1, 3)), in_ram[[4, 10]])


def test_unfamiliarity_is_fitted_on_a_stratified_sample_of_big_training_sets(tmp_path):
    from foldercnn.data.folders import load_folder
    from foldercnn.training.finish import unfamiliarity_sample

    data = load_folder(scan_folder(make_shapes(tmp_path / "d", per_class=20)), 16)
    assert unfamiliarity_sample(data, 0, log=print, limit=100) is data
    sample = unfamiliarity_sample(data, 0, log=lambda *a: None, limit=30)
    assert len(sample) == 30 and sample.labels.bincount().tolist() == [10, 10, 10]
    assert sample.rows.tolist() == sorted(sample.rows.tolist())  # read forward through the cache
    assert torch.equal(unfamiliarity_sample(data, 0, log=lambda *a: None, limit=30).rows, sample.rows)


def test_changed_or_added_image_invalidates(tmp_path, cache_dir):
    root = make_shapes(tmp_path / "d", per_class=5)
    files = scan_folder(root).files
    before, *_ = decode_cached(files, 16, root)
    before = np.array(before)
    target = files[0]
    Image.new("RGB", (40, 40), (0, 0, 255)).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # even on coarse-mtime filesystems
    after, _, _, hit = decode_cached(files, 16, root)
    assert hit is False
    assert tuple(after[0, 8, 8]) == (0, 0, 255) and not np.array_equal(after[0], before[0])
    assert np.array_equal(np.asarray(after[1:]), before[1:])
    assert len(list((cache_dir / "decoded").glob("*.npy"))) == 1  # the stale entry was dropped
    Image.new("RGB", (40, 40), "white").save(root / "circle" / "new.png")
    more, _, _, hit = decode_cached(scan_folder(root).files, 16, root)
    assert hit is False and len(more) == len(files) + 1


def test_broken_file_reported_from_cache_too(tmp_path, cache_dir):
    root = make_shapes(tmp_path / "d", per_class=3)
    (root / "square" / "bad.png").write_bytes(b"junk")
    files = scan_folder(root).files
    for expect_hit in (False, True):
        arr, good, bad, hit = decode_cached(files, 8, root)
        assert hit is expect_hit and len(bad) == 1 and "not an image" in bad[0][1] and len(arr) == len(files) - 1


def test_time_budget_stops_training(shapes_dirs, tmp_path):
    t = time.perf_counter()
    result = foldercnn.train(
        shapes_dirs[0], tmp_path / "run", epochs=10_000, image_size=24, time_budget=6, log=lambda *a: None
    )
    elapsed = time.perf_counter() - t
    # stopped by the budget, not by the epoch count (the margin is for a loaded machine, not a speed claim)
    assert 1 <= len(result.history) < 10_000 and result.model_path.is_file()
    assert elapsed < 6 + 60


def test_schedule_ends_at_zero():
    assert lr_factor("onecycle", 0.0) > 0 and lr_factor("onecycle", 0.2) == pytest.approx(1.0)
    assert lr_factor("onecycle", 1.0) == 0.0 and lr_factor("constant", 0.7) == 1.0


def test_precision_auto_falls_back_to_fp32(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("FOLDERCNN_PRECISION", raising=False)
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(runtime, "bf16_supported", lambda device: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_precision("fp32", cpu) == "fp32"


def test_the_environment_can_force_what_auto_means(monkeypatch):
    """FOLDERCNN_PRECISION=fp32 (or bf16) runs a whole suite as a host of the other kind would."""
    cpu = torch.device("cpu")
    for supported in (False, True):
        monkeypatch.setattr(runtime, "bf16_supported", lambda device, s=supported: s)
        for forced in ("fp32", "bf16"):
            monkeypatch.setenv("FOLDERCNN_PRECISION", forced)
            assert runtime.resolve_precision("auto", cpu) == forced
            assert runtime.resolve_precision("fp32", cpu) == "fp32"  # an explicit choice still wins
    monkeypatch.setenv("FOLDERCNN_PRECISION", "fp16")
    with pytest.raises(OptionError, match="FOLDERCNN_PRECISION"):
        runtime.resolve_precision("auto", cpu)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_in_each_precision(shapes_dirs, tmp_path, precision):
    result = foldercnn.train(
        shapes_dirs[0], tmp_path / precision, epochs=1, image_size=24, precision=precision, log=lambda *a: None
    )
    meta = foldercnn.load(result.model_path).metadata
    assert meta["precision"] == precision


def test_flip_tta_is_mirror_symmetric():
    torch.manual_seed(0)
    model = create_model("fast-cnn", num_classes=3).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = predict_logits(model, x, tta=True), predict_logits(model, x.flip(-1), tta=True)
    assert torch.allclose(a, b, atol=1e-5)


def test_weight_ema_moves_toward_weights():
    torch.manual_seed(0)
    model = create_model("fast-cnn", num_classes=2)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for _ in range(100):
        ema.update(model)
    for e, p in zip(ema.model.parameters(), model.parameters()):
        assert torch.allclose(e, p, atol=1e-3)
