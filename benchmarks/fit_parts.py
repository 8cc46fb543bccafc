"""The two fits of a probe job on kept features, each beside the way it was done before, in one process:

1. the unfamiliarity score's cluster-held-out threshold: ~15 fits, each without one k-means cluster. Baseline: each
   fit from scratch on a copy of the kept rows, exact eigen-decomposition. Today: sums over all rows computed once
   and the left-out rows subtracted (exact), the top eigen-directions by a few steps of subspace iteration from the
   whole fit's (models/unfamiliar.py).
2. the head: 4 weight decays x 300 full-batch AdamW steps. Baseline: autograd's backward of the summed
   cross-entropies. Today: the gradient written out (training/transfer.py, _cross_entropy_gradient).

    python benchmarks/fit_parts.py --photos ../shared/data/rps-photos/green-screen [--per-class 500] [--threads 1]

Features: EfficientNet-Lite0's (the `transfer` recipe's) of --per-class photos per class, kept in --store (computed
once). 80% of them train, 20% validate, as a probe job's split would.
"""

import argparse
import random
import time
from pathlib import Path

import torch

from foldercnn import runtime
from foldercnn.data.folders import scan_folder
from foldercnn.models import unfamiliar
from foldercnn.training.cached_probe import Backbone
from foldercnn.training.recipes import get_recipe
from foldercnn.training.transfer import HeadSearch, _fit_heads


def features(photos, per_class, store, seed):
    folder = scan_folder(photos)
    rng = random.Random(seed)
    pick = sorted(
        i
        for c in range(len(folder.classes))
        for i in rng.sample([i for i, label in enumerate(folder.labels) if label == c], per_class)
    )
    folder.files, folder.labels = [folder.files[i] for i in pick], [folder.labels[i] for i in pick]
    records = Backbone(get_recipe("probe"), store).records(folder)
    return records.clean, records.flip, records.files.labels


def exact_held_out_scores(x, y, xv, yv, num_classes, rank):
    """The cluster-held-out scores as they were computed before: one fit from scratch per cluster."""
    original = unfamiliar._Sums.fit

    def from_scratch(self, drop=None, start=None):
        if drop is None:
            return original(self)
        keep = torch.ones(len(self.idx), dtype=torch.bool)
        keep[drop] = False
        return unfamiliar._Sums(self.x, self.y, len(self.counts), self.rank, self.idx[keep]).fit()

    unfamiliar._Sums.fit = from_scratch
    try:
        return unfamiliar.held_out_scores(x, y, xv, yv, num_classes, rank)
    finally:
        unfamiliar._Sums.fit = original


def autograd_heads(features, labels, num_classes, weight_decays, steps, seed):
    """_fit_heads as it was: autograd's backward through one wide linear layer."""
    import torch.nn.functional as F

    from foldercnn.training.transfer import FullBatchAdam, initial_wide

    k = len(weight_decays)
    wide = initial_wide(features.shape[1], k, num_classes, seed)
    keep = 1 - 0.01 * torch.tensor(weight_decays, dtype=torch.float32).repeat_interleave(num_classes)
    opt = FullBatchAdam(wide.parameters(), lr=0.01)
    for _ in range(steps):
        logits = wide(features).view(len(features), k, num_classes)
        loss = sum(F.cross_entropy(logits[:, j], labels) for j in range(k))
        opt.zero_grad()
        loss.backward()
        with torch.no_grad():
            wide.weight.mul_(keep[:, None])
            wide.bias.mul_(keep)
        opt.step()
    return wide


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=Path, required=True)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--store", type=Path, default=Path("/tmp/foldercnn-fit-parts-store"))
    ap.add_argument("--threads", type=int, default=1, help="a teaching worker runs on one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runtime.setup(threads=args.threads)
    clean, flip, labels = features(args.photos, args.per_class, args.store, args.seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(args.seed))
    train, val = order[: int(0.8 * len(order))], order[int(0.8 * len(order)) :]
    x, y, xv, yv = clean[train], labels[train], clean[val], labels[val]
    num_classes, rank = int(labels.max()) + 1, unfamiliar.default_rank(x.shape[1])
    print(f"{len(x)} training and {len(xv)} validation images, {x.shape[1]}-d features, {args.threads} thread(s)")

    f, fl = torch.cat([x, flip[train]]), torch.cat([y, y])
    decays, steps = HeadSearch().weight_decays, HeadSearch().steps
    for _ in range(2):  # the second round is the one to read: the first pays for PyTorch's first calls
        before, t_before = timed(exact_held_out_scores, x, y, xv, yv, num_classes, rank)
        today, t_today = timed(unfamiliar.fit, x, y, xv, yv, num_classes=num_classes)
        q_before = float(torch.quantile(before.double(), unfamiliar.QUANTILE))
        print(
            f"unfamiliarity threshold: from scratch {t_before:.2f}s (held-out fits only) | today {t_today:.2f}s "
            f"(the whole fit included) | ratio {t_before / t_today:.1f}x | threshold {q_before:.6g} vs "
            f"{today.threshold:.6g} (relative difference {abs(today.threshold - q_before) / q_before:.1e})"
        )
        old, t_old = timed(autograd_heads, f, fl, num_classes, decays, steps, args.seed)
        new, t_new = timed(_fit_heads, f, fl, num_classes, decays, steps, args.seed)
        diff = float((old.weight - new.weight).detach().abs().max())
        print(
            f"heads ({len(f)} views, {len(decays)} x {steps} steps): autograd {t_old:.2f}s | written out "
            f"{t_new:.2f}s | ratio {t_old / t_new:.2f}x | largest weight difference {diff:.1e}"
        )


if __name__ == "__main__":
    main()
