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
from ..models.preprocess import eval_batches, normalize, to_device, to_unit
from ..models.tta import predict_logits
from . import checkpoint as ckpt
from .run import RunContext


def make_optimizer(model, recipe):
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "rmsprop":  # Keras defaults: rho 0.9, epsilon 1e-7
        return torch.optim.RMSprop(params, lr=recipe.lr, alpha=0.9, eps=1e-7, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay
        )
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


def train_side(recipe, progress):
    """The side of the training batches at `progress` in [0, 1]: recipe.start_size, growing in steps of 16 px
    to image_size by 3/4 of the run (progressive resizing: early epochs are cheaper); image_size without it."""
    start, end = recipe.start_size, recipe.image_size
    if not start or start >= end:
        return end
    grown = (end - start) * min(1.0, progress / 0.75)
    return min(end, start + 16 * int(grown // 16))


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
            chunk = self.perm[self.pos : self.pos + self.batch_size - count]
            self.pos += len(chunk)
            count += len(chunk)
            take.append(chunk)
        return torch.cat(take)

    def peek(self):
        """The next batch's indices as far as the current permutation holds them; changes nothing."""
        return self.perm[self.pos : self.pos + self.batch_size]


@torch.no_grad()
def evaluate_model(model, data, recipe, run):
    """Mean cross-entropy and accuracy of `model` on DecodedImages (no augmentation).

    Under DDP each rank scores its share of the images and the sums are added up, so every rank gets the
    same numbers (and keeps the same best epoch)."""
    if run.ranks.world > 1:
        data = data.subset(run.ranks.shard(torch.arange(len(data))))
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for x, y in eval_batches(data, recipe.mean, recipe.std, run.device):
        with runtime.autocast(run.device, run.precision):
            logits = predict_logits(model, x, recipe.tta)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train(was_training)
    total_loss, correct, n = run.ranks.sum([total_loss, correct, len(data)])
    n = max(1, n)
    return total_loss / n, correct / n


class TrainBatches:
    """The training batches of a fit, ready for the model: the seeded order (BatchStream), this rank's share,
    the next batch's read started early (memory-mapped sets), device move, augmentation, normalisation, channels
    last. `step` counts the batches drawn; it seeds each rank's augmentation under DDP."""

    def __init__(self, train, recipe, run, generator, progress):
        self.train, self.recipe, self.run, self.generator = train, recipe, run, generator
        self.progress = progress  # the share of the run done (Fit.progress): decides the side of each batch
        self.order = BatchStream(len(train), min(recipe.batch_size, len(train)), generator)
        self.step = 0

    def epoch(self, steps, stop):
        """Up to `steps` batches (x, y, weight): fewer when stop() says so before a batch is drawn. weight: this
        rank's share of the global batch times the world size (1 for one process), for its loss."""
        for _ in range(steps):
            if stop():
                return
            yield self._next()

    def _next(self):
        ranks, device = self.run.ranks, self.run.device
        global_idx = next(self.order)
        idx = ranks.shard(global_idx)
        self.train.prefetch(ranks.shard(self.order.peek()))  # its reads overlap this step (memory-mapped sets)
        y = to_device(self.train.labels[idx], device)
        x = to_unit(to_device(self.train.take(idx), device))
        side = train_side(self.recipe, self.progress())
        if self.recipe.start_size and x.shape[-2:] != (side, side):
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        x = augment_batch(
            x,
            self.recipe.augment,
            ranks.augmentation_generator(self.run.seed, self.step, self.generator),
        )
        self.step += 1
        x = normalize(x, self.recipe.mean, self.recipe.std).contiguous(memory_format=torch.channels_last)
        return x, y, len(idx) * ranks.world / len(global_idx)


@dataclass
class FitResult:
    history: list = field(default_factory=list)  # one dict per finished epoch
    best_state: dict | None = None
    best_epoch: int = 0
    interrupted: bool = False
    frozen: object = None  # training/transfer.FrozenOutputs of a probe or fine-tuning, for the passes after it


def _is_better(stats, best):
    """Higher validation accuracy wins; a tie goes to the later epoch.

    Small validation splits often saturate (100% from mid-run on); the later epoch has trained longer
    at a lower learning rate and generalises better than an early one with a lucky low loss.
    """
    return best is None or stats["val_accuracy"] >= best["val_accuracy"]


def fit(model, train, val, recipe, run=None, evaluate=None):
    """Train `model` on decoded images; validate every epoch. Ctrl-C stops after keeping the best so far.

    run (a RunContext): device, precision, seed, events (an "epoch" event per epoch), the writer (history and
    checkpoint after every epoch), resume (a checkpoint's state to continue from) and deadline: a
    time.perf_counter() value; training then runs epochs until it (not recipe.epochs), and the learning-rate
    schedule follows elapsed time instead of steps, so it still ends at zero. Under torchrun (run.ranks) each rank
    trains on its share of every global batch through DistributedDataParallel; a Ctrl-C then stops the run (the
    last checkpoint keeps it), since the ranks cannot agree on where they were stopped. evaluate: model ->
    (validation loss, accuracy), for a caller that scores the validation images faster than evaluate_model does
    (a fine-tuning on the kept outputs of its frozen layers).
    """
    return Fit(model, train, val, recipe, run or RunContext(), evaluate).run()


class Fit:
    """One call of `fit`: its state lives here, so several fits can run side by side."""

    def __init__(self, model, train, val, recipe, run, evaluate=None):
        self.model, self.val, self.recipe, self.run_ = model, val, recipe, run
        self.evaluate = evaluate or (lambda scored: evaluate_model(scored, val, recipe, run))
        self.generator = torch.Generator().manual_seed(run.seed)  # batch order (same on every rank), augmentation
        model.to(run.device).to(memory_format=torch.channels_last).train()
        self.net = run.ranks.wrap(model, run.device)  # what the steps call: DDP around model, or model itself
        self.optimizer = make_optimizer(model, recipe)
        self.ema = WeightEMA(model, recipe.ema) if recipe.ema else None
        self.batches = TrainBatches(train, recipe, run, self.generator, self.progress)
        self.steps = recipe.steps_per_epoch or math.ceil(len(train) / recipe.batch_size)
        self.epochs = recipe.epochs if run.deadline is None else 1_000_000
        self.result, self.best, self.first_epoch, spent = FitResult(), None, 1, 0.0
        if run.resume is not None:
            spent = self._restore(*run.resume)
        self.fit_start, self.val_seconds = time.perf_counter() - spent, 0.0

    def _restore(self, info, tensors):
        self.result.best_state = ckpt.restore(
            info,
            tensors,
            model=self.model,
            optimizer=self.optimizer,
            generator=self.generator,
            batches=self.batches.order,
            ema=self.ema,
        )
        self.result.history, self.result.best_epoch = info["history"], info["best_epoch"]
        self.best = self.result.history[self.result.best_epoch - 1] if self.result.best_epoch else None
        self.batches.step, self.first_epoch = info["step"], info["epoch"] + 1
        self.run_.events(
            f"resumed after epoch {info['epoch']} (step {info['step']}, {info['seconds_spent']:.0f} s already spent)"
        )
        return info["seconds_spent"]

    def progress(self):
        """The share of the run done, 0 to 1: by steps, or by the clock with a deadline."""
        run = self.run_
        if run.deadline is None:
            return self.batches.step / (self.steps * self.epochs)
        # rank 0's clock decides, so all ranks use the same learning rate and stop at the same step
        return run.ranks.broadcast(
            min(
                1.0,
                (time.perf_counter() - self.fit_start) / max(1e-9, run.deadline - self.val_seconds - self.fit_start),
            )
        )

    def out_of_time(self):
        return self.run_.deadline is not None and self.progress() >= 1.0

    def run(self):
        try:
            for epoch in range(self.first_epoch, self.epochs + 1):
                start = time.perf_counter()
                sums = self.train_epoch(epoch)
                if sums[2] == 0:
                    break
                self.end_epoch(epoch, sums, start)
                if self.out_of_time():
                    self.run_.events("time budget spent")
                    break
        except KeyboardInterrupt:
            if self.run_.ranks.world > 1:  # the other ranks may be mid-step: no agreed state but the last checkpoint
                raise
            self.result.interrupted = True
            self.run_.events(
                f"\ninterrupted: keeping the {'best' if self.recipe.keep == 'best' else 'last'} "
                f"finished epoch ({self.result.best_epoch or 'none'})"
            )
        return self.result

    def train_epoch(self, epoch):
        """One epoch of steps; returns the whole epoch's (loss sum, correct, images) over all ranks."""
        recipe, run = self.recipe, self.run_
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            total=self.steps,
            desc=f"epoch {epoch}/{recipe.epochs if run.deadline is None else '?'}",
            unit="step",
            leave=False,
            disable=None if run.ranks.is_main else True,
        )
        for x, y, weight in self.batches.epoch(self.steps, stop=self.out_of_time):
            for group in self.optimizer.param_groups:
                group["lr"] = recipe.lr * lr_factor(recipe.schedule, self.progress())
            logits, plain = self.step(x, y, weight, epoch)
            loss_sum += plain * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.update()
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        return run.ranks.sum([loss_sum, correct, seen])

    def step(self, x, y, weight, epoch):
        """One optimiser step; (logits, the batch's plain cross-entropy, without label smoothing)."""
        recipe = self.recipe
        with runtime.autocast(self.run_.device, self.run_.precision):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
        if not torch.isfinite(loss):  # a learning rate too high: every later weight would be NaN
            raise FolderCNNError(
                f"training diverged: the loss became {loss.item()} in epoch {epoch}; nothing was "
                f"saved from this run (try a lower learning rate than {recipe.lr:g})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight if weight != 1 else loss).backward()  # DDP averages the ranks' gradients: weigh each share
        self.optimizer.step()
        if self.ema:
            self.ema.update(self.model)
        # report plain cross-entropy (no smoothing) so training and validation losses compare
        plain = loss if not recipe.label_smoothing else F.cross_entropy(logits.detach().float(), y)
        return logits, plain.item()

    def end_epoch(self, epoch, sums, start):
        """Validate, keep the best weights, tell the events, write history and checkpoint."""
        recipe, run, result = self.recipe, self.run_, self.result
        (loss_sum, correct, seen), train_seconds = sums, time.perf_counter() - start
        scored = self.ema.model if self.ema else self.model
        val_loss, val_acc = self.evaluate(scored)
        self.val_seconds = time.perf_counter() - start - train_seconds
        stats = {
            "epoch": epoch,
            "loss": loss_sum / seen,
            "accuracy": correct / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": time.perf_counter() - start,
            "train_seconds": train_seconds,
            "images": seen,
        }
        result.history.append(stats)
        improved = recipe.keep == "last" or _is_better(stats, self.best)
        if improved:
            self.best, result.best_epoch = stats, epoch
            result.best_state = {k: v.detach().clone() for k, v in scored.state_dict().items()}
        run.events.emit(
            "epoch",
            **{k: stats[k] for k in ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "seconds")},
            epochs=recipe.epochs if run.deadline is None else None,
            best=improved and recipe.keep == "best",
            progress=self.progress(),
        )
        run.writer.history(result.history)
        run.writer.checkpoint(
            {
                "epoch": epoch,
                "step": self.batches.step,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "seconds_spent": time.perf_counter() - self.fit_start,
            },
            model=self.model,
            optimizer=self.optimizer,
            generator=self.generator,
            batches=self.batches.order,
            ema=self.ema,
            best_state=result.best_state,
        )
