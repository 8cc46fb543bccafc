"""Checkpoints: everything `fit` needs to continue a run exactly where its last finished epoch left it.

RUN_DIR/checkpoint.safetensors is rewritten atomically after every epoch: model (and EMA) weights, the best
epoch's weights, the optimizer's state, the batch order (the current permutation and the position in it),
the random generators (the augmentation generator, torch's, numpy's and Python's), the epoch, step, history,
seconds already spent, and what the run was started with (recipe, seed, precision, a fingerprint of the data
files and of the validation split), so a changed folder or recipe is noticed. Tensors go in safetensors, the
rest in its JSON metadata: no pickle. A run killed at any moment (kill -9 included) loses at most the epoch
it was in, and in fp32 on a CPU with the same seed ends with the same weights and history, bit for bit.
"""

import hashlib
import json
import os
import random

import numpy as np
import torch

from ..data.cache import file_stamps
from ..errors import FolderCNNError
from ..files import atomic_path

FILE = "checkpoint.safetensors"
KEY = "foldercnn_checkpoint"
VERSION = 1


def data_files(*sets):
    """{path: "size:mtime_ns"} of every image of the decoded sets, with the stamps read when they were decoded
    (so each file is stat'ed once per run); what a checkpoint keeps to say which files changed."""
    out = {}
    for data in sets:
        stamps = data.stamps or file_stamps(data.paths)
        out.update({str(p): s for p, s in zip(data.paths, stamps)})
    return out


def fingerprint(files, extra=()):
    """A short hash of data_files(...) and anything else that defines the run's data (the split's sizes)."""
    h = hashlib.sha256()
    for p, stamp in files.items():
        h.update(os.fsencode(p) + f"\0{stamp}\n".encode())  # a file name need not be UTF-8: its bytes
    for item in extra:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def describe_changes(before, after, limit=3):
    """What differs between two data_files(...) maps, for people: "a.png modified; 2 added (b.png, c.png)"."""
    parts = []
    for what, names in (
        ("modified", [p for p in after if p in before and before[p] != after[p]]),
        ("added", [p for p in after if p not in before]),
        ("removed", [p for p in before if p not in after]),
    ):
        if names:
            shown = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
            parts.append(f"{len(names)} {what} ({shown})")
    return "; ".join(parts) or "the split changed"


def _rng_states():
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            *map(lambda v: v.item() if hasattr(v, "item") else v, np_state[2:]),
        ],
    }


def _set_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save(path, *, model, optimizer, generator, batches, ema, best_state, info):
    """Write the checkpoint atomically. `info`: JSON-able facts (epoch, step, history, identity, ...)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.model.state_dict().items()})
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
    opt = optimizer.state_dict()
    plain_state = {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{name}"] = value
            else:
                plain_state.setdefault(str(index), {})[name] = value
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["batches.perm"] = batches.perm
    meta = {
        "version": VERSION,
        **info,
        "optimizer": {"param_groups": opt["param_groups"], "plain": plain_state},
        "batches_pos": batches.pos,
        "ema_updates": ema.updates if ema is not None else None,
        "rng": _rng_states(),
    }
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={KEY: json.dumps(meta)})


def read(path):
    """(info dict, tensors) of a checkpoint, or a clear error."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise FolderCNNError(f"{path} is not a usable foldercnn checkpoint ({e}); delete it to start over") from None
    if meta.get("version") != VERSION:
        raise FolderCNNError(f"{path} was written by another foldercnn version; delete it to start over")
    return meta, tensors


def restore(meta, tensors, *, model, optimizer, generator, batches, ema):
    """Put a run back in the state `save` recorded; returns the best epoch's weights (or None)."""

    def part(prefix):
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."), strict=True)
    if ema is not None:
        ema.model.load_state_dict(part("ema."), strict=True)
        ema.updates = meta["ema_updates"]
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["plain"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    _set_rng_states(meta["rng"])
    batches.perm, batches.pos = tensors["batches.perm"], meta["batches_pos"]
    best = part("best.")
    return best or None
