"""What `foldercnn.runtime.setup()`'s allocator tuning is worth: training throughput with and without it.

    python benchmarks/runtime_settings.py [--rounds 3] [--steps 30]

glibc's mallopt settings are process-wide and cannot be undone, so each measurement runs in a fresh child
process; the two configurations alternate round by round (the host's speed drifts), and the ratio is printed
per round and as the median. Each child trains the `fast` recipe's network (64 px, batch 64) and the `seed`
recipe's tutorial CNN (150 px, batch 32) on synthetic batches with the recipe's precision (bf16 where native).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

CHILD = """
import json, sys, time, torch
import torch.nn.functional as F
from foldercnn import runtime
from foldercnn.models.registry import create_model
tune = sys.argv[1] == "tuned"
torch.set_num_threads(runtime.physical_cores())
if tune:
    assert runtime.tune_malloc()
device = torch.device("cpu")
precision = runtime.resolve_precision("auto", device)
out = {}
for name, size, batch in (("fast-cnn", 64, 64), ("tutorial-cnn", 150, 32)):
    args = {"image_size": size} if name == "tutorial-cnn" else {}
    torch.manual_seed(0)
    model = create_model(name, 3, **args).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (batch,))
    def step():
        with runtime.autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(5):
        step()
    steps = int(sys.argv[2])
    t = time.perf_counter()
    for _ in range(steps):
        step()
    out[name] = steps * batch / (time.perf_counter() - t)
print(json.dumps({"precision": precision, **out}))
"""


def run(config, steps):
    r = subprocess.run([sys.executable, "-c", CHILD, config, str(steps)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    ratios = {"fast-cnn": [], "tutorial-cnn": []}
    print(f"{'round':>5} {'network':>13} {'default img/s':>14} {'tuned img/s':>12} {'ratio':>6}")
    for r in range(1, args.rounds + 1):
        order = ("default", "tuned") if r % 2 else ("tuned", "default")
        got = {c: run(c, args.steps) for c in order}
        for net in ratios:
            ratio = got["tuned"][net] / got["default"][net]
            ratios[net].append(ratio)
            print(f"{r:>5} {net:>13} {got['default'][net]:>14.1f} {got['tuned'][net]:>12.1f} {ratio:>5.2f}x")
    print(f"precision {got['tuned']['precision']}")
    for net, rs in ratios.items():
        print(
            f"CLAIM malloc tuning, {net} training: median {statistics.median(rs):.2f}x "
            f"(range {min(rs):.2f}-{max(rs):.2f}x over {len(rs)} rounds)"
        )


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t:.0f} s)")
