"""Training: the loop (`fit`) and the whole folder -> run directory job (`train_folder`)."""
import copy
import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import runtime
from .augment import augment_batch
from .bundle import save_model
from .calibration import DEFAULT_UNCERTAIN_BELOW, choose_temperature
from .data import check_same_classes, load_folder, scan_folder, stratified_split, summarize_skipped
from .errors import FolderCNNError
from .evaluate import calibration_summary
from .files import check_out_dir, write_text
from .models import count_parameters, create_model, predict_logits, summary
from .plots import augmentation_preview, sample_grid, training_curves
from .preprocess import default_preprocessing, normalize, preprocess, to_unit
from .recipes import get_recipe

HISTORY_FIELDS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


def make_optimizer(model, recipe):
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "rmsprop":  # Keras defaults: rho 0.9, epsilon 1e-7
        return torch.optim.RMSprop(params, lr=recipe.lr, alpha=0.9, eps=1e-7, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, nesterov=True,
                               weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise FolderCNNError(f"unknown optimizer '{recipe.optimizer}'")


def lr_factor(schedule, progress):
    """Multiplier of the base learning rate at `progress` in [0, 1] of the run (steps or time)."""
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":  # linear warm-up over the first 20%, then linear decay to zero
        if progress < 0.2:
            return 0.05 + 0.95 * progress / 0.2
        return max(0.0, (1.0 - progress) / 0.8)
    raise FolderCNNError(f"unknown schedule '{schedule}'")


class WeightEMA:
    """Exponential moving average of a model's weights (batch-norm statistics copied as they are).

    The decay ramps up from 0 so the average is not dominated by the random initial weights.
    """

    def __init__(self, model, decay):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_params = [p for p in self.model.parameters()]
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


def index_batches(n, batch_size, generator):
    """Endless stream of index batches drawn from successive seeded permutations (like Keras' iterator)."""
    perm, pos = torch.randperm(n, generator=generator), 0
    while True:
        take, count = [], 0
        while count < batch_size:
            if pos >= n:
                perm, pos = torch.randperm(n, generator=generator), 0
            chunk = perm[pos: pos + batch_size - count]
            pos += len(chunk)
            count += len(chunk)
            take.append(chunk)
        yield torch.cat(take)


@torch.no_grad()
def evaluate_model(model, data, mean, std, device, precision, tta=False, batch_size=256):
    """Mean cross-entropy and accuracy of `model` on DecodedImages (no augmentation)."""
    labels = data.labels
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = preprocess(data.take(slice(start, start + batch_size)).to(device), mean, std)
        y = labels[start:start + batch_size].to(device)
        with runtime.autocast(device, precision):
            logits = predict_logits(model, x, tta)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    n = max(1, len(labels))
    return total_loss / n, correct / n


@torch.no_grad()
def collect_logits(model, data, mean, std, device, tta=False, batch_size=256):
    """float32 logits for every image of DecodedImages, computed exactly as prediction does (fp32, eval)."""
    was_training = model.training
    model.eval()
    out = [predict_logits(model, preprocess(data.take(slice(s, s + batch_size)).to(device), mean, std)
                          .contiguous(memory_format=torch.channels_last), tta).cpu()
           for s in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(data.classes))


def calibrate(model, val, recipe, device, uncertain_below=DEFAULT_UNCERTAIN_BELOW):
    """Fit the softmax temperature on the validation split (never on a test folder) for the model file."""
    logits = collect_logits(model, val, recipe.mean, recipe.std, device, recipe.tta)
    labels = val.labels
    t, rule = choose_temperature(logits, labels)
    summary = calibration_summary(logits, labels, t)
    before, after = summary["uncalibrated"], summary["calibrated"]
    return {"temperature": t, "uncertain_below": uncertain_below, "rule": rule,
            "fitted_on": f"validation split ({len(val)} images)",
            "val_errors": int((logits.argmax(1) != labels).sum()),
            "val_nll_before": before["nll"], "val_nll_after": after["nll"],
            "val_ece_before": before["ece"], "val_ece_after": after["ece"]}


@dataclass
class FitResult:
    history: list = field(default_factory=list)  # one dict per finished epoch
    best_state: dict = None
    best_epoch: int = 0
    interrupted: bool = False


def _is_better(stats, best):
    """Higher validation accuracy wins; a tie goes to the later epoch.

    Small validation splits often saturate (100% from mid-run on); the later epoch has trained longer
    at a lower learning rate and generalises better than an early one with a lucky low loss.
    """
    return best is None or stats["val_accuracy"] >= best["val_accuracy"]


def fit(model, train, val, recipe, *, device, precision, seed, log=print, on_epoch=None, deadline=None):
    """Train `model` on decoded images; validate every epoch. Ctrl-C stops after keeping the best so far.

    deadline: a time.perf_counter() value; training runs epochs until it (not recipe.epochs), and the
    learning-rate schedule follows elapsed time instead of steps, so it still ends at zero.
    All state lives in locals and arguments, so several fits can run side by side (and, later, per rank).
    """
    g = torch.Generator().manual_seed(seed)
    model.to(device).to(memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model, recipe)
    ema = WeightEMA(model, recipe.ema) if recipe.ema else None
    steps = recipe.steps_per_epoch or math.ceil(len(train) / recipe.batch_size)
    epochs = recipe.epochs if deadline is None else 1_000_000
    total_steps, step = steps * epochs, 0
    fit_start, val_seconds = time.perf_counter(), 0.0
    batches = index_batches(len(train), min(recipe.batch_size, len(train)), g)
    result, best = FitResult(), None

    def progress():
        if deadline is None:
            return step / total_steps
        return min(1.0, (time.perf_counter() - fit_start) / max(1e-9, deadline - val_seconds - fit_start))

    try:
        for epoch in range(1, epochs + 1):
            start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            label = f"epoch {epoch}/{recipe.epochs if deadline is None else '?'}"
            bar = tqdm(range(steps), desc=label, unit="step", leave=False, disable=None)
            for _ in bar:
                if deadline is not None and progress() >= 1.0:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * lr_factor(recipe.schedule, progress())
                idx = next(batches)
                y = train.labels[idx].to(device)
                x = augment_batch(to_unit(train.take(idx).to(device)), recipe.augment, g)
                x = normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)
                with runtime.autocast(device, precision):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                if ema:
                    ema.update(model)
                # report plain cross-entropy (no smoothing) so training and validation losses compare
                plain = loss if not recipe.label_smoothing else F.cross_entropy(logits.detach().float(), y)
                loss_sum += plain.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            bar.close()
            if seen == 0:
                break
            train_seconds = time.perf_counter() - start
            scored = ema.model if ema else model
            val_loss, val_acc = evaluate_model(scored, val, recipe.mean, recipe.std,
                                               device, precision, tta=recipe.tta)
            val_seconds = time.perf_counter() - start - train_seconds
            stats = {"epoch": epoch, "loss": loss_sum / seen, "accuracy": correct / seen,
                     "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.perf_counter() - start,
                     "train_seconds": train_seconds, "images": seen}
            result.history.append(stats)
            improved = recipe.keep == "last" or _is_better(stats, best)
            if improved:
                best = stats
                result.best_epoch = epoch
                result.best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
            log(f"epoch {epoch:>3}/{recipe.epochs if deadline is None else '?'}  loss {stats['loss']:.4f}  "
                f"accuracy {stats['accuracy']:.4f}  val_loss {val_loss:.4f}  val_accuracy {val_acc:.4f}  "
                f"{stats['seconds']:.1f}s" + ("  *" if improved and recipe.keep == "best" else ""))
            if on_epoch:
                on_epoch(result)
            if deadline is not None and progress() >= 1.0:
                log("time budget spent")
                break
    except KeyboardInterrupt:
        result.interrupted = True
        log(f"\ninterrupted: keeping the {'best' if recipe.keep == 'best' else 'last'} finished epoch "
            f"({result.best_epoch or 'none'})")
    return result


def write_history(path, history):
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{h[k]:.6f}" if isinstance(h[k], float) else h[k]) for k in HISTORY_FIELDS})
    write_text(path, buf.getvalue())


def read_history(path):
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


@dataclass
class TrainResult:
    out_dir: Path
    model_path: Path
    history: list
    best_epoch: int
    classes: list
    recipe: object
    interrupted: bool
    n_train: int
    n_val: int
    skipped: list
    seconds: dict


def prepare_data(data_dir, recipe, val_dir=None, val_fraction=None, seed=0, log=print):
    """Scan and decode the training (and validation) images once; split if no validation folder."""
    if val_dir is not None and val_fraction is not None:
        raise FolderCNNError("give either --val or --val-fraction, not both")
    folder = scan_folder(data_dir)
    if val_dir is not None:
        val_folder = scan_folder(val_dir, min_classes=1)
        check_same_classes(folder.classes, val_dir, val_folder.classes)
        train = load_folder(folder, recipe.image_size)
        val = load_folder(val_folder, recipe.image_size)
        skipped = train.skipped + val.skipped
        log(f"validation: {len(val)} images from {val_dir}")
    else:
        fraction = 0.2 if val_fraction is None else val_fraction
        everything = load_folder(folder, recipe.image_size)
        train_idx, val_idx = stratified_split(everything.labels, fraction, seed)
        if len(val_idx) == 0:
            raise FolderCNNError(f"too few images in {data_dir} to hold out a validation split")
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        skipped = everything.skipped
        how = "default " if val_fraction is None else ""
        log(f"validation: a stratified {fraction:.0%} of {data_dir} held out ({how}--val-fraction, seed {seed}): "
            f"{len(train)} images train, {len(val)} validate")
    if skipped:
        log(f"skipped {len(skipped)} file(s):\n{summarize_skipped(skipped)}")
    return train, val, skipped


def data_summary(data_dir, val_dir, val_fraction, train, val, skipped, max_listed=50):
    """What the model was trained on, for the model file and the report."""
    counts = {c: [int((train.labels == i).sum()), int((val.labels == i).sum())] for i, c in enumerate(train.classes)}
    how = f"the folder {val_dir}" if val_dir is not None else \
        f"a stratified {0.2 if val_fraction is None else val_fraction:.0%} held out of the training folder"
    return {"train_dir": str(data_dir), "validation": how, "counts": counts, "n_skipped": len(skipped),
            "skipped": [{"path": str(p), "reason": r} for p, r in skipped[:max_listed]]}


def train_folder(data_dir, out_dir, recipe="fast", val_dir=None, val_fraction=None, seed=0,
                 precision="auto", device="auto", time_budget=None, fine_tune=False,
                 uncertain_below=DEFAULT_UNCERTAIN_BELOW, log=print, **overrides):
    """Train a classifier on DATA_DIR and write the run directory. Returns a TrainResult.

    time_budget: seconds of wall clock for the whole job, decoding included; training runs as many
    epochs as fit in it (the learning-rate schedule follows the clock) and keeps the best epoch.
    """
    recipe = get_recipe(recipe, **overrides) if isinstance(recipe, str) else recipe
    if fine_tune and not recipe.linear_probe:
        raise FolderCNNError(f"--fine-tune applies to --recipe transfer, not '{recipe.name}'")
    check_out_dir(out_dir, [data_dir, val_dir])
    runtime.setup()
    device = runtime.choose_device(device)
    precision = runtime.resolve_precision(precision, device)
    t0 = time.perf_counter()
    if time_budget is not None and not time_budget > 0:
        raise FolderCNNError(f"--time-budget must be positive, got {time_budget}")
    # about a second is kept back for saving the model and drawing the curves
    deadline = None if time_budget is None else t0 + time_budget - 1.0
    train, val, skipped = prepare_data(data_dir, recipe, val_dir, val_fraction, seed, log)
    t_data = time.perf_counter() - t0
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    model = create_model(recipe.model, len(train.classes), **recipe.model_args,
                         **({"pretrained": True} if recipe.pretrained else {}))
    log(f"recipe '{recipe.name}': {recipe.description}")
    log(f"model {recipe.model} at {recipe.image_size}x{recipe.image_size}, {count_parameters(model):,} parameters, "
        f"{device.type} {precision}, {torch.get_num_threads()} threads")
    log(summary(model, recipe.image_size))
    preview_idx = [int((train.labels == c).nonzero()[0]) for c in range(len(train.classes))
                   if (train.labels == c).any()][:4]
    augmentation_preview(train.take(torch.tensor(preview_idx)), recipe.augment, out_dir / "augmentations.png", seed=seed)
    shown = torch.cat([(train.labels == c).nonzero().flatten()[:: max(1, int((train.labels == c).sum()) // 6)][:6]
                       for c in range(len(train.classes))])  # six spread-out images per class, not a copy of all
    sample_grid(train.take(shown), train.labels[shown], train.classes, out_dir / "samples.png",
                title=f"{Path(data_dir).name}: training images per class ({recipe.image_size} px, as the model sees them)")

    def checkpoint_history(result):
        write_history(out_dir / "history.csv", result.history)

    t1 = time.perf_counter()
    if deadline is not None:
        log(f"time budget: {time_budget:g} s in all, {deadline - time.perf_counter():.1f} s left for training")
    if recipe.linear_probe:
        from .transfer import freeze_for_fine_tuning, linear_probe
        result = linear_probe(model, train, val, recipe, device=device, precision=precision, seed=seed, log=log)
        if fine_tune:
            log(f"fine-tuning the last {recipe.fine_tune_blocks} blocks for {recipe.epochs} epochs")
            model.load_state_dict(result.best_state)
            probe = result
            result = fit(freeze_for_fine_tuning(model, recipe.fine_tune_blocks), train, val, recipe,
                         device=device, precision=precision, seed=seed, log=log, deadline=deadline)
            probe_stats = dict(probe.history[-1], epoch=0)  # epoch 0: the linear probe
            result.history = [probe_stats] + result.history
            result.best_epoch += 1
            if result.best_state is None:  # interrupted before the first fine-tuning epoch finished
                log("no fine-tuning epoch finished; keeping the linear probe")
                result.best_state, result.best_epoch = probe.best_state, 1
            for p in model.parameters():
                p.requires_grad_(True)
            model.frozen_bn = False
    else:
        result = fit(model, train, val, recipe, device=device, precision=precision, seed=seed, log=log,
                     on_epoch=checkpoint_history, deadline=deadline)
    t_train = time.perf_counter() - t1
    if result.best_state is None:
        raise FolderCNNError("stopped before the first epoch finished; no model saved")
    model.load_state_dict(result.best_state)
    best = result.history[result.best_epoch - 1]
    calibration = calibrate(model, val, recipe, device, uncertain_below)
    log(f"calibration on the validation split: temperature {calibration['temperature']:.3f} "
        f"({calibration['rule']}), NLL "
        f"{calibration['val_nll_before']:.4f} -> {calibration['val_nll_after']:.4f}, expected calibration error "
        f"{calibration['val_ece_before']:.4f} -> {calibration['val_ece_after']:.4f}")
    metadata = {
        "architecture": recipe.model,
        "arch_args": recipe.model_args,
        "classes": train.classes,
        "image_size": recipe.image_size,
        "preprocessing": default_preprocessing(recipe.mean, recipe.std),
        "recipe": recipe.to_dict(),
        "seed": seed,
        "precision": precision,
        "tta": recipe.tta,
        "fine_tuned": bool(recipe.linear_probe and fine_tune),
        "calibration": calibration,
        "metrics": {"epoch": result.best_epoch, "epochs_run": len(result.history),
                    "val_accuracy": best["val_accuracy"], "val_loss": best["val_loss"],
                    "train_accuracy": best["accuracy"], "train_loss": best["loss"],
                    "n_train": len(train), "n_val": len(val), "interrupted": result.interrupted},
        "timing": {"data_seconds": t_data, "train_seconds": t_train},
        "data": data_summary(data_dir, val_dir, val_fraction, train, val, skipped),
    }
    model_path = save_model(out_dir / "model.safetensors", model, metadata)
    write_history(out_dir / "history.csv", result.history)
    training_curves(result.history, out_dir / "curves.png",
                    title=f"{recipe.name} recipe: {len(train)} training images, {len(val)} validation")
    from .report import write_report
    log(f"report: {write_report(out_dir)}")
    return TrainResult(out_dir, model_path, result.history, result.best_epoch, train.classes, recipe,
                       result.interrupted, len(train), len(val), skipped,
                       {"data": t_data, "train": t_train})
