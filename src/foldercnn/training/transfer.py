"""Transfer learning: a frozen pretrained backbone, its features computed once, a linear head fitted on them.

The backbone runs over every training image once (plus its mirror image, a cheap augmentation), so
fitting the head takes seconds; the result is an ordinary whole-network model file. A recipe with
`probe_views` also shows the backbone that many randomly augmented views of every image (the `robust`
recipe: new backgrounds, rotations, capture effects), so the head learns what survives those changes.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import runtime
from ..data.augment import augment_batch
from ..models.preprocess import eval_batches, normalize, to_unit
from .loop import FitResult


@dataclass
class Features:
    """Features of the training views and of the validation images, with their labels."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    seconds: float = 0.0  # how long computing them took (spread over the history's rows)
    frozen: "FrozenOutputs | None" = None  # kept for the passes after the head is fitted


# The frozen layers' outputs are kept for later passes up to this size, else those passes recompute them
KEEP_MAX_BYTES = 1 << 30


@dataclass
class FrozenOutputs:
    """What the layers that stay frozen make of the clean training and validation images, kept from the probe's
    feature pass so that the fine-tuning's validation and the passes after training (calibration, the
    unfamiliarity score) run only what was trained. tuned_blocks: the fine-tuned blocks, whose input these are;
    None: a probe alone, and these are the pooled features themselves. A set is None where it was not kept."""

    tuned_blocks: int | None
    precision: str
    train: torch.Tensor | None
    val: torch.Tensor | None


@dataclass(frozen=True)
class HeadSearch:
    """How the head is fitted: full-batch AdamW for `steps`, the weight decay chosen on the validation features;
    within: the strongest weight decay whose validation accuracy is within this of the best one (for validation
    images that are easier than the photos the model will meet)."""

    weight_decays: tuple = (1e-4, 1e-3, 1e-2, 1e-1)
    steps: int = 300
    within: float | None = None


@torch.no_grad()
def extract_features(model, data, recipe, run, flip=False):
    """(N, D) float32 pooled backbone features of DecodedImages, optionally of their mirror images."""
    model.eval()
    out = []
    for x, _ in eval_batches(data, recipe.mean, recipe.std, run.device):
        with runtime.autocast(run.device, run.precision):
            out.append(model.features(x.flip(-1) if flip else x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def features_keeping_prefix(model, data, recipe, run, tuned_blocks):
    """(extract_features' features, the frozen layers' outputs on the way (FrozenOutputs), or None where they would
    take more than KEEP_MAX_BYTES)."""
    model.eval()
    out, kept = [], []
    for x, _ in eval_batches(data, recipe.mean, recipe.std, run.device):
        with runtime.autocast(run.device, run.precision):
            h = model.frozen_prefix(x, tuned_blocks)
            out.append(model.pool_features(model.tail_map(h, tuned_blocks)).float().cpu())
        if kept is not None and h[0].numel() * h.element_size() * len(data) <= KEEP_MAX_BYTES:
            kept.append(h.cpu())
        else:
            kept = None
    return torch.cat(out), (torch.cat(kept) if kept else None)


def describe_kept(frozen):
    """One line on which frozen outputs a fine-tuning keeps (FrozenOutputs)."""
    kept = [(name, t) for name, t in (("training", frozen.train), ("validation", frozen.val)) if t is not None]
    if not kept:
        return (
            f"frozen layers' outputs not kept (over {KEEP_MAX_BYTES / 2**20:.0f} MB): "
            "later passes run the whole network"
        )
    size = sum(t.numel() * t.element_size() for _, t in kept) / 2**20
    return (
        f"frozen layers' outputs kept for {' and '.join(f'{len(t)} {name}' for name, t in kept)} images "
        f"({size:.0f} MB): validation and the passes after training run only the {frozen.tuned_blocks} tuned blocks"
    )


@torch.no_grad()
def tail_pass(model, frozen, which, device, batch_size=256):
    """(logits, penultimate features) of the model on kept FrozenOutputs (which: "train" or "val"): only the tuned
    blocks and the head run, in eval mode, in the precision the outputs were made in."""
    was_training = model.training
    model.eval()
    logits, feats = [], []
    kept = getattr(frozen, which)
    for start in range(0, len(kept), batch_size):
        h = kept[start : start + batch_size].to(device)
        with runtime.autocast(device, frozen.precision):
            f = h if frozen.tuned_blocks is None else model.pool_features(model.tail_map(h, frozen.tuned_blocks))
            lg = model.head(f)
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(feats)


def tail_scores(model, frozen, labels, device):
    """(mean cross-entropy, accuracy) on the kept validation outputs: the loop's evaluate_model without rerunning
    the frozen layers."""
    logits, _ = tail_pass(model, frozen, "val", device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


@torch.no_grad()
def augmented_features(model, data, recipe, run, generator, batch_size=64):
    """Features of one randomly augmented view (recipe.augment) of every image of DecodedImages."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        images = to_unit(data.take(slice(start, start + batch_size)).to(run.device))
        x = normalize(augment_batch(images, recipe.augment, generator), recipe.mean, recipe.std)
        with runtime.autocast(run.device, run.precision):
            out.append(model.features(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)


class FullBatchAdam:
    """torch.optim.Adam's update (betas 0.9 and 0.999, eps 1e-8), written out for a few tensors: the first step of
    any torch.optim optimizer in a process imports torch._dynamo, 2.3 s (benchmarks/README.md), which was most of
    the time a teaching worker takes from start to its first model."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.steps = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.steps += 1
        b1, b2 = self.betas
        step_size = self.lr / (1 - b1**self.steps)
        correction2 = math.sqrt(1 - b2**self.steps)
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / correction2).add_(self.eps), value=-step_size)


def initial_wide(dim, k, num_classes, seed):
    """A wide linear layer of k heads, each starting from the same seeded weights."""
    wide = torch.nn.Linear(dim, k * num_classes)
    with torch.no_grad():
        for j in range(k):
            g = torch.Generator().manual_seed(seed)
            wide.weight[j * num_classes : (j + 1) * num_classes].normal_(0, 0.01, generator=g)
        wide.bias.zero_()
    return wide


def _fit_heads(features, labels, num_classes, weight_decays, steps, seed, record=None):
    """Multinomial logistic regression by full-batch AdamW, one head per weight decay, fitted together as one wide
    linear layer (the features are read once per step, not once per candidate: benchmarks/README.md); each
    head starts from the same seeded weights and has its own loss and decoupled weight decay, as if fitted alone.
    Returns the wide layer, its K * num_classes outputs head by head."""
    k = len(weight_decays)
    wide = initial_wide(features.shape[1], k, num_classes, seed)
    lr = 0.01
    keep = 1 - lr * torch.tensor(weight_decays, dtype=torch.float32).repeat_interleave(num_classes)
    opt = FullBatchAdam(wide.parameters(), lr=lr)
    columns = features.T.contiguous()  # (D, N): W @ X^T and G^T @ X are the fast products (benchmarks/README.md)
    targets = F.one_hot(labels, num_classes).T.float().repeat(k, 1).view(k, num_classes, -1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            _cross_entropy_gradient(wide, features, columns, targets)
            wide.weight.mul_(keep[:, None])  # AdamW's decoupled weight decay, one rate per head
            wide.bias.mul_(keep)
        opt.step()
        if record:
            record(step, wide)
    return wide


def _cross_entropy_gradient(wide, features, columns, targets):
    """Each head's mean cross-entropy gradient, written out ((softmax - one-hot) / N) with the products in the
    orientation the CPU's BLAS runs fastest (benchmarks/README.md), into the layer's .grad."""
    k, num_classes, n = targets.shape
    logits = (wide.weight @ columns + wide.bias[:, None]).view(k, num_classes, n)
    delta = (logits.softmax(1) - targets).view(k * num_classes, n) / n
    wide.weight.grad = delta @ features
    wide.bias.grad = delta.sum(1)


def _head(wide, j, num_classes):
    """Head j of a wide layer from _fit_heads, as its own torch.nn.Linear."""
    head = torch.nn.Linear(wide.in_features, num_classes)
    with torch.no_grad():
        head.weight.copy_(wide.weight[j * num_classes : (j + 1) * num_classes])
        head.bias.copy_(wide.bias[j * num_classes : (j + 1) * num_classes])
    return head


def _wide_scores(wide, num_classes, f, y):
    """[(loss, accuracy)] of every head of a wide layer on features f with labels y."""
    with torch.no_grad():
        logits = wide(f).view(len(f), -1, num_classes)
        return [
            (F.cross_entropy(logits[:, j], y).item(), (logits[:, j].argmax(1) == y).float().mean().item())
            for j in range(logits.shape[1])
        ]


def probe_features(model, train, val, recipe, run, flips=True, tuned_blocks=None):
    """Features of the training images (clean, recipe.probe_views augmented views, mirrored) and of the
    validation images, from the frozen backbone; the outputs of the layers that stay frozen (FrozenOutputs) for a
    fine-tuning of the last tuned_blocks blocks after it, or of the whole backbone (None)."""
    t = time.perf_counter()
    if tuned_blocks is None:
        f_clean, f_val = extract_features(model, train, recipe, run), extract_features(model, val, recipe, run)
        frozen = FrozenOutputs(None, run.precision, f_clean, f_val)
    else:
        f_clean, kept_train = features_keeping_prefix(model, train, recipe, run, tuned_blocks)
        f_val, kept_val = features_keeping_prefix(model, val, recipe, run, tuned_blocks)
        frozen = FrozenOutputs(tuned_blocks, run.precision, kept_train, kept_val)
    f_train, y_train = [f_clean], [train.labels]
    g = torch.Generator().manual_seed(run.seed)
    for _ in range(recipe.probe_views):  # with the clean views: better CGI -> real (benchmarks/README.md)
        f_train.append(augmented_features(model, train, recipe, run, g))
        y_train.append(train.labels)
    if flips:
        f_train.append(extract_features(model, train, recipe, run, flip=True))
        y_train.append(train.labels)
    return Features(torch.cat(f_train), torch.cat(y_train), f_val, val.labels, time.perf_counter() - t, frozen)


def linear_probe(model, train, val, recipe, run, search=HeadSearch(), tuned_blocks=None):
    """Fit model.head on frozen features; the weight decay is chosen on the validation split. With a deadline,
    the weight-decay search stops trying candidates once it has passed (at least one is always fitted).
    tuned_blocks: the blocks a fine-tuning will train next (their input is kept: FrozenOutputs)."""
    model.to(run.device).to(memory_format=torch.channels_last)
    run.events.stage("features", 0.0, "computing the pretrained features")
    # a fine-tuning after the probe sees mirrored views itself: its probe skips them (benchmarks/README.md)
    features = probe_features(model, train, val, recipe, run, flips=tuned_blocks is None, tuned_blocks=tuned_blocks)
    run.events(
        f"features: {len(features.train)} training views and {len(features.val)} validation images in "
        f"{features.seconds:.1f}s"
    )
    if tuned_blocks is not None:
        run.events(describe_kept(features.frozen))
    return fit_head_on_features(model, features, run, search)


def _best_candidate(tried, search):
    """Index into tried [(weight decay, val accuracy, val loss)] of the weight decay the search keeps."""
    best = max(range(len(tried)), key=lambda k: (tried[k][1], -tried[k][2]))
    if search.within is not None:
        close = [k for k in range(len(tried)) if tried[k][1] >= tried[best][1] - search.within]
        best = max(close, key=lambda k: tried[k][0])
    return best


def fit_head_on_features(model, features, run, search=HeadSearch()):
    """Fit model.head on computed Features, the weight decay chosen on the validation features among
    search.weight_decays (fitted together); a FitResult whose history has ten rows along the chosen fit. With a
    deadline already passed, only the first weight decay is fitted."""
    run.events.stage("head", 0.6, "fitting the head")
    t = time.perf_counter()
    num_classes = model.head.out_features
    decays = search.weight_decays
    if run.deadline is not None and time.perf_counter() >= run.deadline and len(decays) > 1:
        run.events("time budget spent: weight-decay search stopped early")
        decays = decays[:1]
    rows, chunk = [[] for _ in decays], max(1, search.steps // 10)

    def record(step, wide):
        if step % chunk == 0:
            train_scores = _wide_scores(wide, num_classes, features.train, features.train_labels)
            val_scores = _wide_scores(wide, num_classes, features.val, features.val_labels)
            for k, ((loss, acc), (val_loss, val_acc)) in enumerate(zip(train_scores, val_scores)):
                rows[k].append(
                    {
                        "epoch": step // chunk,
                        "loss": loss,
                        "accuracy": acc,
                        "val_loss": val_loss,
                        "val_accuracy": val_acc,
                        "seconds": 0.0,
                        "train_seconds": 0.0,
                        "images": 0,
                    }
                )

    wide = _fit_heads(features.train, features.train_labels, num_classes, decays, search.steps, run.seed, record)
    tried = []
    for wd, (val_loss, val_acc) in zip(decays, _wide_scores(wide, num_classes, features.val, features.val_labels)):
        run.events(f"  head weight decay {wd:g}: val_accuracy {val_acc:.4f}  val_loss {val_loss:.4f}")
        tried.append((wd, val_acc, val_loss))
    best = _best_candidate(tried, search)
    head, history = _head(wide, best, num_classes), rows[best]
    t_head = time.perf_counter() - t
    run.events(
        f"head fitted in {t_head:.1f}s (weight decay {decays[best]:g}); val_accuracy {history[-1]['val_accuracy']:.4f}"
    )
    for h in history:
        h["seconds"] = (features.seconds + t_head) / len(history)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)
    return FitResult(
        history=history,
        best_epoch=len(history),
        best_state={k: v.detach().clone() for k, v in model.state_dict().items()},
        frozen=features.frozen,
    )
