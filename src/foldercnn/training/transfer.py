"""Transfer learning: a frozen pretrained backbone, its features computed once, a linear head fitted on them.

The backbone runs over every training image once (plus its mirror image, a cheap augmentation), so
fitting the head takes seconds; the result is an ordinary whole-network model file. A recipe with
`probe_views` also shows the backbone that many randomly augmented views of every image (the `robust`
recipe: new backgrounds, rotations, capture effects), so the head learns what survives those changes.
"""
import time

import torch
import torch.nn.functional as F

from .. import runtime
from ..data.augment import augment_batch
from ..models.preprocess import normalize, preprocess, to_unit
from .loop import FitResult


@torch.no_grad()
def extract_features(model, data, mean, std, device, precision, flip=False, batch_size=64, augment=None,
                     generator=None):
    """(N, D) float32 pooled backbone features of DecodedImages (randomly augmented by an AugmentConfig)."""
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        images = runtime.to_device(data.take(slice(start, start + batch_size)), device)
        if augment is None:
            x = preprocess(images, mean, std)
        else:
            x = normalize(augment_batch(to_unit(images), augment, generator), mean, std)
        if flip:
            x = x.flip(-1)
        with runtime.autocast(device, precision):
            out.append(model.features(x.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out)


def _fit_head(features, labels, num_classes, weight_decay, steps, seed, record=None):
    """Multinomial logistic regression by full-batch Adam; returns (weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=0.01, weight_decay=weight_decay)
    for step in range(1, steps + 1):
        loss = F.cross_entropy(head(features), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if record:
            record(step, head)
    return head


def linear_probe(model, train, val, recipe, *, device, precision, seed, log=print, flips=True, steps=300,
                 weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), deadline=None):
    """Fit model.head on frozen features; the weight decay is chosen on the validation split.

    deadline (a time.perf_counter() value): the weight-decay search stops trying candidates once it has
    passed (at least one is always fitted), so the probe honours --time-budget after its feature pass."""
    model.to(device).to(memory_format=torch.channels_last)
    t = time.perf_counter()
    f_train = extract_features(model, train, recipe.mean, recipe.std, device, precision)
    y_train = train.labels
    if recipe.probe_views:  # the clean views too: on 160 px CGI -> real, rps/test 82% -> 87% with them
        g = torch.Generator().manual_seed(seed)
        f_train = torch.cat([f_train] + [extract_features(model, train, recipe.mean, recipe.std, device, precision,
                                                          augment=recipe.augment, generator=g)
                                         for _ in range(recipe.probe_views)])
        y_train = train.labels.repeat(recipe.probe_views + 1)
    if flips:
        f_train = torch.cat([f_train, extract_features(model, train, recipe.mean, recipe.std, device, precision,
                                                       flip=True)])
        y_train = torch.cat([y_train, train.labels])
    f_val = extract_features(model, val, recipe.mean, recipe.std, device, precision)
    t_features = time.perf_counter() - t
    log(f"features: {len(f_train)} training views and {len(f_val)} validation images in {t_features:.1f}s")
    return fit_head_on_features(model, f_train, y_train, f_val, val.labels, len(train.classes), seed=seed, log=log,
                                deadline=deadline, t_features=t_features, steps=steps, weight_decays=weight_decays)


def fit_head_on_features(model, f_train, y_train, f_val, y_val, num_classes, *, seed, log=print, deadline=None,
                         t_features=0.0, steps=300, weight_decays=(1e-4, 1e-3, 1e-2, 1e-1), within=None):
    """Fit model.head on computed features, the weight decay chosen on the validation features; a FitResult.

    within: take the strongest weight decay whose validation accuracy is within this of the best one (for
    validation images that are easier than the photos the model will meet)."""
    def scores(head, f, y):
        with torch.no_grad():
            logits = head(f)
            return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    t = time.perf_counter()
    tried = []
    for wd in weight_decays:
        if tried and deadline is not None and time.perf_counter() >= deadline:
            log("time budget spent: weight-decay search stopped early")
            break
        head = _fit_head(f_train, y_train, num_classes, wd, steps, seed)
        val_loss, val_acc = scores(head, f_val, y_val)
        log(f"  head weight decay {wd:g}: val_accuracy {val_acc:.4f}  val_loss {val_loss:.4f}")
        tried.append((wd, val_acc, val_loss))
    best = max(tried, key=lambda r: (r[1], -r[2]))
    if within is not None:
        best = max((r for r in tried if r[1] >= best[1] - within), key=lambda r: r[0])
    history, chunk = [], steps // 10

    def record(step, head):
        if step % chunk == 0:
            loss, acc = scores(head, f_train, y_train)
            val_loss, val_acc = scores(head, f_val, y_val)
            history.append({"epoch": step // chunk, "loss": loss, "accuracy": acc, "val_loss": val_loss,
                            "val_accuracy": val_acc, "seconds": 0.0, "train_seconds": 0.0, "images": 0})
    head = _fit_head(f_train, y_train, num_classes, best[0], steps, seed, record)
    t_head = time.perf_counter() - t
    log(f"head fitted in {t_head:.1f}s (weight decay {best[0]:g}); val_accuracy {history[-1]['val_accuracy']:.4f}")
    for h in history:
        h["seconds"] = (t_features + t_head) / len(history)
    with torch.no_grad():
        model.head.weight.copy_(head.weight)
        model.head.bias.copy_(head.bias)
    return FitResult(history=history, best_epoch=len(history),
                     best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
