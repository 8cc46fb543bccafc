"""The GPU path: `train --device cuda` (bf16 autocast, channels-last, pinned-memory batches, augmentation on the
GPU) gives a model file that predicts on the CPU. Skipped, with the reason, where PyTorch sees no CUDA GPU;
the refusal of --device cuda runs there instead."""

import pytest
import torch

import foldercnn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to PyTorch")


def test_device_cuda_without_a_gpu_is_refused_clearly(cli, shapes_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    r = cli("train", shapes_dirs[0], "--out", tmp_path / "run", "--device", "cuda", "--epochs", "1")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--device cuda: PyTorch sees no CUDA GPU" in r.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()


@needs_cuda
@pytest.mark.slow
def test_a_model_trained_on_the_gpu_predicts_on_the_cpu(shapes_dirs, tmp_path):
    result = foldercnn.train(
        shapes_dirs[0],
        tmp_path / "run",
        recipe="fast",
        epochs=8,
        image_size=32,
        seed=0,
        device="cuda",
        log=lambda *a: None,
    )
    assert result.history[-1]["val_accuracy"] >= 0.8
    on_gpu = foldercnn.load(result.model_path, device="cuda")
    on_cpu = foldercnn.load(result.model_path, device="cpu")
    metrics = foldercnn.evaluate(on_cpu, shapes_dirs[1])
    assert metrics.accuracy >= 0.8
    images = sorted(p for p in shapes_dirs[1].rglob("*.png"))[:12]
    assert [p.label for p in on_gpu.predict_many(images)] == [p.label for p in on_cpu.predict_many(images)]
