"""Train the `seed` recipe (the Keras tutorial, exactly) on Rock-Paper-Scissors and print its speed.

    python benchmarks/seed_recipe.py --data ../shared/data/rps [--epochs 3]

Like the tutorial, it trains on train/ (2520 images) and validates on test/ (372) every epoch, so the
per-epoch validation accuracy IS the test accuracy. Before training it times a few steps of the same
model in plain float32 (the baseline, same process) to show what the speed-ups buy.
"""

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from foldercnn import runtime
from foldercnn.models.preprocess import preprocess
from foldercnn.models.registry import create_model
from foldercnn.training.loop import fit
from foldercnn.training.options import TrainOptions
from foldercnn.training.prepare import prepare_data
from foldercnn.training.recipes import get_recipe
from foldercnn.training.run import RunContext, RunWriter


def steps_per_second(recipe, data, precision, steps, channels_last, device):
    torch.manual_seed(0)
    model = create_model(recipe.model, len(data.classes), **recipe.model_args).to(device).train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.RMSprop(model.parameters(), lr=recipe.lr, alpha=0.9, eps=1e-7)
    x = preprocess(data.images[: recipe.batch_size], recipe.mean, recipe.std).contiguous(memory_format=fmt)
    y = data.labels[: recipe.batch_size]
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        with runtime.autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return recipe.batch_size / (sum(times) / len(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/rps")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--baseline-steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    data = Path(args.data)
    runtime.setup()
    device = runtime.choose_device()
    precision = runtime.resolve_precision("auto", device)
    recipe = get_recipe("seed", epochs=args.epochs)
    print(f"device {device}, {torch.get_num_threads()} threads, precision {precision}")
    t = time.perf_counter()
    train, test, _ = prepare_data(data / "train", recipe, TrainOptions(val_dir=str(data / "test")), events=print)
    print(f"decode: {len(train) + len(test)} images at {recipe.image_size}px in {time.perf_counter() - t:.1f}s")

    base = steps_per_second(recipe, train, "fp32", args.baseline_steps, False, device)
    fast = steps_per_second(recipe, train, precision, args.baseline_steps, True, device)
    print(
        f"throughput, batch {recipe.batch_size}: float32 NCHW {base:.1f} img/s (baseline) | "
        f"{precision} channels-last {fast:.1f} img/s | ratio {fast / base:.2f}x"
    )

    torch.manual_seed(args.seed)
    model = create_model(recipe.model, len(train.classes), **recipe.model_args)
    print(
        f"\n{'epoch':>5} {'seconds':>8} {'train img/s':>12} {'loss':>7} {'accuracy':>9} {'test_loss':>10} "
        f"{'test_acc':>9}"
    )

    def show(history):
        h = history[-1]
        print(
            f"{h['epoch']:>5} {h['seconds']:>8.1f} {h['images'] / h['train_seconds']:>12.1f} {h['loss']:>7.4f} "
            f"{h['accuracy']:>9.4f} {h['val_loss']:>10.4f} {h['val_accuracy']:>9.4f}",
            flush=True,
        )

    t = time.perf_counter()

    class Show(RunWriter):  # told after every epoch
        def history(self, rows):
            show(rows)

    result = fit(model, train, test, recipe, RunContext(device, precision, args.seed, writer=Show()))
    total = time.perf_counter() - t
    h = result.history
    print(
        f"\n{len(h)} epochs in {total:.0f}s ({total / len(h):.1f} s/epoch); "
        f"final test accuracy {h[-1]['val_accuracy']:.4f}; "
        f"projected 25-epoch time {25 * total / len(h) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
