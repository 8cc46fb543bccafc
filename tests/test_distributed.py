"""Training one model in several processes (torchrun, DistributedDataParallel over gloo on 127.0.0.1): two
processes with half the batch each train the model one process trains with the whole batch; only rank 0
writes and prints; `train --nproc N` launches torchrun itself."""

import csv

import pytest
from safetensors.torch import load_file

from testkit import make_shapes, run_cli

# fp32, no augmentation, a small learning rate: six steps where float rounding stays below the tolerance.
# (At the fast recipe's lr 0.05 these batch-norm nets amplify rounding: one process on 1 vs 2 threads already
# differs by ~1e-3 after six steps.) Measured here: weights within 4e-7, batch-norm running statistics within
# 7e-6 (float32 variance of near-constant white backgrounds); batch norm not synchronised, or ranks taking the
# same share of a batch, miss by more than 1e-4 (weights) and 0.07 (running statistics).
EPOCHS = 2
COMMON = [
    "--epochs",
    str(EPOCHS),
    "--batch-size",
    "16",
    "--image-size",
    "32",
    "--precision",
    "fp32",
    "--no-augment",
    "--lr",
    "0.00005",
    "--seed",
    "5",
]
TOLERANCE = 1e-5


def model_tensors(run):
    """The network's tensors in model.safetensors; the unfamiliarity statistics (an inverted covariance of
    the final features, whose large entries magnify any last-digit difference) are left out."""
    return {k: v for k, v in load_file(str(run / "model.safetensors")).items() if not k.startswith("unfamiliar.")}


def history(run):
    with open(run / "history.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("ddp") / "data", per_class=16, size=40, seed=11)


@pytest.fixture(scope="module")
def runs(small_folder, tmp_path_factory):
    """(one process with batch 16, two processes with 8 each, their torchrun log folder)."""
    base = tmp_path_factory.mktemp("runs")
    single = run_cli("train", small_folder, "--out", base / "single", *COMMON)
    assert single.returncode == 0, single.stderr
    r = run_cli("train", small_folder, "--out", base / "ddp", *COMMON, "--nproc", "2")  # torchrun, launched for you
    assert r.returncode == 0, r.stderr + (r.stdout or "")
    return base / "single", base / "ddp", r


@pytest.mark.slow
def test_two_processes_with_half_the_batch_train_the_same_model_as_one(runs):
    single, ddp, _ = runs
    a, b = model_tensors(single), model_tensors(ddp)
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a}
    stats = {k for k in a if ".running_" in k or k.endswith("num_batches_tracked")}
    weights = max(v for k, v in diff.items() if k not in stats)
    print(
        f"2 processes vs 1, max abs difference: weights {weights:.3g}, "
        f"running statistics {max(diff[k] for k in stats):.3g}"
    )
    assert weights < TOLERANCE
    for k in stats:  # estimates of the data's statistics, of order 1: the same bound relative to their size
        assert diff[k] <= TOLERANCE * (1 + a[k].abs().max().item()), (k, diff[k])
    assert [r["val_accuracy"] for r in history(single)] == [r["val_accuracy"] for r in history(ddp)]


@pytest.mark.slow
def test_only_rank_0_writes_and_prints(runs):
    single, ddp, launched = runs
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    out = launched.stdout  # both ranks' output reaches train --nproc's: rank 1 says nothing
    assert out.count("epoch   1/") == 1 and out.count("saved ") == 1 and "2 processes" in out


def test_a_batch_that_does_not_split_evenly_is_refused(small_folder, tmp_path):
    r = run_cli("train", small_folder, "--out", tmp_path / "run", "--nproc", "2", "--batch-size", "15")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "foldercnn: error: --batch-size 15 cannot be split over 2 processes: it is the "
        "global batch, each process takes an equal share (use a multiple of 2)"
    )
    assert not (tmp_path / "run").exists()
    r = run_cli("train", small_folder, "--out", tmp_path / "run", "--nproc", "2", "--recipe", "transfer")
    assert r.returncode == 2 and "runs in one process" in r.stderr and "Traceback" not in r.stderr
