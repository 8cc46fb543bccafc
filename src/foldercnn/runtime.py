"""Where and how tensors run: device, threads, allocator, precision. Chosen here and only here."""

import contextlib
import ctypes
import os

import torch

from .errors import OptionError


def choose_device(requested="auto"):
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise OptionError(
            "device",
            f"cuda: PyTorch sees no CUDA GPU here (torch {torch.__version__}, {build}); use device cpu or auto",
        )
    return device


def physical_cores():
    """Physical cores this process may run on (hyper-threads share one core's FPUs)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, phys, core = set(), None, "0", None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu = int(value)
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and cpu is not None:
                    if cpu in allowed:
                        cores.add((phys, core if core is not None else cpu))
                    cpu, core = None, None
        if cpu is not None and cpu in allowed:
            cores.add((phys, core if core is not None else cpu))
    except OSError:
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def tune_malloc():
    """Keep glibc from returning big activation buffers to the kernel after every step.

    Default PyTorch training on CPU spends a large share of its time in page faults because
    glibc mmaps each large buffer and unmaps it on free. Measured ~1.4x training throughput.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
    int_max = 2**31 - 1  # mallopt takes a C int; a bigger Python int would silently wrap
    ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TOP_PAD, 256 << 20)
    ok = ok and libc.mallopt(M_TRIM_THRESHOLD, int_max)
    return bool(ok)


def local_processes():
    """Processes torchrun started on this machine (LOCAL_WORLD_SIZE), 1 otherwise: they share its cores."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def setup(threads=None):
    """Process-wide settings for fast CPU work; call once from a command's entry point."""
    torch.set_num_threads(threads or max(1, physical_cores() // local_processes()))
    tune_malloc()


def bf16_supported(device):
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_precision(precision, device):
    """'auto' means bf16 autocast where the hardware computes it natively, else fp32; $FOLDERCNN_PRECISION (bf16
    or fp32) makes 'auto' mean that instead, so a whole test suite can run as another kind of host would."""
    if precision == "auto":
        forced = os.environ.get("FOLDERCNN_PRECISION", "").strip()
        if forced:
            if forced not in ("bf16", "fp32"):
                raise OptionError("precision", f"$FOLDERCNN_PRECISION must be bf16 or fp32, got {forced!r}")
            return forced
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise OptionError("precision", f"must be auto, bf16 or fp32, got {precision!r}")
    return precision


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
