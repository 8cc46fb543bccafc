"""Folders bigger than the memory a training process may use: the child process of benchmarks/scale.py trains,
in a memory cgroup, on a folder whose decoded cache ends up larger than the cgroup's limit, and finishes.

Runs where this process may create a memory cgroup (root on cgroup v1 or a delegated v2 tree, as in CI); skipped
with the reason otherwise."""

import importlib.util
import os
from pathlib import Path

import pytest

from testkit import make_shapes

SCALE = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"
LIMIT_MB = 750  # the training child's anonymous memory peaks near 580 MB (bf16) to 610 MB (fp32) at 96 px, batch 16
IMAGE_SIZE = 96  # 27 KB per decoded image: 32 copies of 1,200 images make a ~1,010 MB cache


def load_scale_benchmark():
    spec = importlib.util.spec_from_file_location("foldercnn_benchmark_scale", SCALE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_training_on_a_folder_whose_cache_is_bigger_than_the_memory_limit(tmp_path):
    scale = load_scale_benchmark()
    group = scale.MemoryCgroup(LIMIT_MB * 2**20)
    if group.path is None:
        pytest.skip(group.reason)
    try:
        base = make_shapes(tmp_path / "base", per_class=400, size=IMAGE_SIZE, fmt="jpg")
        data = scale.scaled_copy(base, 32, tmp_path)
        cache = tmp_path / "cache"
        row = scale.run_child(
            data,
            tmp_path / "run",
            3,
            group,
            image_size=IMAGE_SIZE,
            batch_size=16,
            env={**os.environ, "FOLDERCNN_CACHE": str(cache)},
        )
        assert row["images"] == 3 * 16
        assert (tmp_path / "run" / "model.safetensors").is_file()
        assert scale.cache_mb(cache) > 1.2 * LIMIT_MB  # the cache outgrew the limit; the kernel dropped its pages
        assert group.peak_mb() <= LIMIT_MB + 1
    finally:
        group.remove()
