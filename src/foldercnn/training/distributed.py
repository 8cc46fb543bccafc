"""Several processes training one model: `torchrun --nproc-per-node N -m foldercnn train ...`.

torchrun starts N copies of the command and sets WORLD_SIZE, RANK and LOCAL_RANK in each; `start` joins them
into one process group (gloo on CPUs, nccl on CUDA) and the loop wraps the model in DistributedDataParallel.
Without those variables (or with WORLD_SIZE 1) `start` returns SINGLE and nothing here does anything: the run
is the single process it always was, bit for bit.

What is kept in step: every rank draws the same permutation of the training images (same seed) and takes its
own contiguous share of each global batch (--batch-size stays the global batch); DDP averages the gradients;
batch-norm statistics are computed over the global batch (`sync_batchnorm`); validation counts are summed
over the ranks, so every rank sees the same numbers and keeps the same best epoch. Only rank 0 writes files and
prints. The augmentation of each rank's share is drawn from a generator seeded by (seed, step, rank), so a
checkpoint written by rank 0 resumes every rank exactly, whatever the number of processes.
"""

import contextlib
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import FolderCNNError, OptionError


def launched_world_size():
    """Processes torchrun started for this run (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world(recipe, world):
    """Refuse, before any process group exists, what cannot be split over `world` processes."""
    if world <= 1:
        return
    if recipe.batch_size % world:
        raise OptionError(
            "batch_size",
            f"{recipe.batch_size} cannot be split over {world} processes: it is the "
            f"global batch, each process takes an equal share (use a multiple of {world})",
        )
    if recipe.linear_probe:  # features are computed once and the head fitted in seconds: nothing to share
        raise FolderCNNError(
            f"recipe '{recipe.name}' fits a linear probe, which runs in one process; "
            "train it without torchrun or --nproc"
        )


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes, and the few collective operations training needs.

    Every method is a no-op (returns its input) for a single process, so the loop reads the same either way."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self):
        return self.rank == 0

    def stop(self):
        if self.owns_group:
            dist.destroy_process_group()

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    @contextlib.contextmanager
    def local_main_first(self):
        """Local rank 0 of each machine runs the block first (e.g. fills the decode cache), the others after."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def sum(self, values):
        """The element-wise sum of a list of numbers over all ranks (ints stay ints); float64 on the wire."""
        if self.world == 1:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return [int(s) if isinstance(v, int) else float(s) for v, s in zip(values, t.tolist())]

    def broadcast(self, value):
        """Rank 0's float on every rank: decisions taken from a clock (time budget) must agree everywhere."""
        if self.world == 1:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._device())
        dist.broadcast(t, src=0)
        return float(t.item())

    def shard(self, index):
        """This rank's contiguous share of a global batch of indices (sizes differ by at most one)."""
        if self.world == 1:
            return index
        return torch.tensor_split(index, self.world)[self.rank]

    def augmentation_generator(self, seed, step, fallback):
        """The generator for this step's augmentation: `fallback` (the loop's one generator) for a single
        process; under DDP one seeded by (seed, step, rank), so ranks draw different augmentations, the batch
        order's generator is the same on all of them, and a resumed run redraws exactly the same."""
        if self.world == 1:
            return fallback
        key = hashlib.sha256(f"foldercnn-augment|{seed}|{step}|{self.rank}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)

    def wrap(self, model, device):
        """DistributedDataParallel around `model` (its batch norms made global first), or `model` itself."""
        if self.world == 1:
            return model
        sync_batchnorm(model, device)
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def _device(self):
        # nccl only moves CUDA tensors; gloo takes CPU ones
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


SINGLE = Ranks()


def start(device):
    """(Ranks, device): join the process group torchrun prepared, or SINGLE when not launched by torchrun.
    On CUDA each process takes the GPU of its local rank."""
    if launched_world_size() <= 1:
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()  # a caller that set up its own group keeps it
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks), on any device.

    torch's SyncBatchNorm refuses CPU tensors (torch 2.13: "expected input tensor to be on GPU"), so on CPUs
    the two sums it needs per channel travel through gloo here; gradients flow through them as well, so
    N ranks with batch B/N compute what one process computes with batch B. Eval mode is plain BatchNorm2d."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims = [0, 2, 3]
        local = torch.cat([x.float().sum(dims), x.new_tensor([x.numel() / x.shape[1]], dtype=torch.float32)])
        total = _SumOverRanks.apply(local)
        n = total[-1].detach()
        mean = total[:-1] / n
        centred = x.float() - mean.view(1, -1, 1, 1)  # two passes: a mean of squares loses digits
        var = _SumOverRanks.apply((centred * centred).sum(dims)) / n
        with torch.no_grad():  # running statistics as BatchNorm2d keeps them (unbiased variance)
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach() * n / max(float(n) - 1.0, 1.0), factor)
        scale = torch.rsqrt(var + self.eps) * self.weight
        return (centred * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)


def sync_batchnorm(model, device):
    """Make every trainable BatchNorm2d of `model` compute its statistics over all ranks, in place (the
    parameters and buffers stay the same tensors, so state-dict keys, optimizer and model file are unchanged):
    torch's SyncBatchNorm on CUDA, GlobalBatchNorm2d on CPUs."""
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats:
            if device.type == "cuda":
                new = nn.SyncBatchNorm(child.num_features, child.eps, child.momentum)
            else:
                new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum)
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def launch(argv, nproc, recipe):
    """Run `foldercnn <argv>` (the command line without --nproc) in `nproc` processes on this machine through
    torch's own launcher (torch.distributed.run, i.e. torchrun, with a free local rendezvous port); returns its
    exit code. What cannot be split over nproc processes is refused here, once, not by every process."""
    if launched_world_size() > 1:
        raise FolderCNNError("nproc starts torchrun; this command already runs under it")
    check_world(recipe, nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "foldercnn",
        *without_option(argv, "--nproc"),
    ]
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached torchrun and its workers too; SIGTERM only us: pass it on
        proc.terminate()
        return proc.wait()


def without_option(argv, flag):
    """The command line minus `flag VALUE` (or `flag=VALUE`): what each launched process runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out
