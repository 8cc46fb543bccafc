"""The training loop (`fit`): augmentation on whole batches, one-cycle schedule, optional weight EMA,
validation every epoch, the best epoch kept. Knows nothing about folders or files."""
import copy
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import runtime
from ..data.augment import augment_batch
from ..errors import FolderCNNError
from ..models.preprocess import normalize, preprocess, to_unit
from ..models.registry import predict_logits
from . import checkpoint as ckpt
from .distributed import SINGLE


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


class BatchStream:
    """Endless stream of index batches drawn from successive seeded permutations (like Keras' iterator).

    Its whole state is the current permutation and the position in it (plus the generator), so a checkpoint
    can record it and a resumed run draws the very same batches."""

    def __init__(self, n, batch_size, generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm, self.pos = torch.randperm(n, generator=generator), 0

    def __next__(self):
        take, count = [], 0
        while count < self.batch_size:
            if self.pos >= self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
            chunk = self.perm[self.pos: self.pos + self.batch_size - count]
            self.pos += len(chunk)
            count += len(chunk)
            take.append(chunk)
        return torch.cat(take)

    def peek(self):
        """The next batch's indices as far as the current permutation holds them; changes nothing."""
        return self.perm[self.pos: self.pos + self.batch_size]


@torch.no_grad()
def evaluate_model(model, data, mean, std, device, precision, tta=False, batch_size=64, ranks=SINGLE):
    """Mean cross-entropy and accuracy of `model` on DecodedImages (no augmentation).

    Under DDP each rank scores its share of the images and the sums are added up, so every rank gets the
    same numbers (and keeps the same best epoch)."""
    if ranks.world > 1:
        data = data.subset(ranks.shard(torch.arange(len(data))))
    labels = data.labels
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x = preprocess(runtime.to_device(data.take(slice(start, start + batch_size)), device), mean, std)
        y = runtime.to_device(labels[start:start + batch_size], device)
        with runtime.autocast(device, precision):
            logits = predict_logits(model, x, tta)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    total_loss, correct, n = ranks.sum([total_loss, correct, len(labels)])
    n = max(1, n)
    return total_loss / n, correct / n


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


def fit(model, train, val, recipe, *, device, precision, seed, log=print, on_epoch=None, deadline=None,
        checkpoint=None, resume=None, ranks=SINGLE):
    """Train `model` on decoded images; validate every epoch. Ctrl-C stops after keeping the best so far.

    deadline: a time.perf_counter() value; training runs epochs until it (not recipe.epochs), and the
    learning-rate schedule follows elapsed time instead of steps, so it still ends at zero.
    checkpoint(write): called after every epoch with write(path, extra_info) that saves the run's whole state
    (see checkpoint.py); resume: a checkpoint's (info, tensors) to continue from instead of starting.
    All state lives in locals and arguments, so several fits can run side by side.
    ranks: under torchrun (distributed.py) each rank trains on its share of every global batch of
    recipe.batch_size images through DistributedDataParallel; a Ctrl-C then stops the run (the last checkpoint
    keeps it), since the ranks cannot agree on where they were stopped.
    """
    g = torch.Generator().manual_seed(seed)  # the batch order (same on every rank) and, in one process, augmentation
    model.to(device).to(memory_format=torch.channels_last).train()
    net = ranks.wrap(model, device)  # what the training steps call: DDP around model, or model itself
    optimizer = make_optimizer(model, recipe)
    ema = WeightEMA(model, recipe.ema) if recipe.ema else None
    steps = recipe.steps_per_epoch or math.ceil(len(train) / recipe.batch_size)
    epochs = recipe.epochs if deadline is None else 1_000_000
    total_steps, step, first_epoch, spent = steps * epochs, 0, 1, 0.0
    batches = BatchStream(len(train), min(recipe.batch_size, len(train)), g)
    result, best = FitResult(), None
    if resume is not None:
        info, tensors = resume
        result.best_state = ckpt.restore(info, tensors, model=model, optimizer=optimizer, generator=g,
                                         batches=batches, ema=ema)
        result.history, result.best_epoch = info["history"], info["best_epoch"]
        best = result.history[result.best_epoch - 1] if result.best_epoch else None
        step, first_epoch, spent = info["step"], info["epoch"] + 1, info["seconds_spent"]
        log(f"resumed after epoch {info['epoch']} (step {step}, {spent:.0f} s already spent)")
    fit_start, val_seconds = time.perf_counter() - spent, 0.0

    def progress():
        if deadline is None:
            return step / total_steps
        # rank 0's clock decides, so all ranks use the same learning rate and stop at the same step
        return ranks.broadcast(
            min(1.0, (time.perf_counter() - fit_start) / max(1e-9, deadline - val_seconds - fit_start)))

    try:
        for epoch in range(first_epoch, epochs + 1):
            start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            label = f"epoch {epoch}/{recipe.epochs if deadline is None else '?'}"
            bar = tqdm(range(steps), desc=label, unit="step", leave=False,
                       disable=None if ranks.is_main else True)
            for _ in bar:
                if deadline is not None and progress() >= 1.0:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * lr_factor(recipe.schedule, progress())
                global_idx = next(batches)
                idx = ranks.shard(global_idx)
                train.prefetch(ranks.shard(batches.peek()))  # its reads overlap this step (memory-mapped sets)
                y = runtime.to_device(train.labels[idx], device)
                x = augment_batch(to_unit(runtime.to_device(train.take(idx), device)), recipe.augment,
                                  ranks.augmentation_generator(seed, step, g))
                x = normalize(x, recipe.mean, recipe.std).contiguous(memory_format=torch.channels_last)
                with runtime.autocast(device, precision):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                if not torch.isfinite(loss):  # a learning rate too high: every later weight would be NaN
                    raise FolderCNNError(f"training diverged: the loss became {loss.item()} in epoch {epoch}; "
                                         f"nothing was saved from this run (try a lower learning rate than "
                                         f"{recipe.lr:g})")
                optimizer.zero_grad(set_to_none=True)
                if ranks.world > 1:  # DDP averages the ranks' gradients: weigh each by its share of the batch
                    (loss * (len(idx) * ranks.world / len(global_idx))).backward()
                else:
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
            loss_sum, correct, seen = ranks.sum([loss_sum, correct, seen])  # the whole epoch's, on every rank
            if seen == 0:
                break
            train_seconds = time.perf_counter() - start
            scored = ema.model if ema else model
            val_loss, val_acc = evaluate_model(scored, val, recipe.mean, recipe.std,
                                               device, precision, tta=recipe.tta, ranks=ranks)
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
            if checkpoint:
                info = {"epoch": epoch, "step": step, "history": result.history, "best_epoch": result.best_epoch,
                        "seconds_spent": time.perf_counter() - fit_start}
                checkpoint(lambda path, extra=None: ckpt.save(
                    path, model=model, optimizer=optimizer, generator=g, batches=batches, ema=ema,
                    best_state=result.best_state, info={**info, **(extra or {})}))
            if deadline is not None and progress() >= 1.0:
                log("time budget spent")
                break
    except KeyboardInterrupt:
        if ranks.world > 1:  # the other ranks may be mid-step: no agreed state to save but the last checkpoint
            raise
        result.interrupted = True
        log(f"\ninterrupted: keeping the {'best' if recipe.keep == 'best' else 'last'} finished epoch "
            f"({result.best_epoch or 'none'})")
    return result
