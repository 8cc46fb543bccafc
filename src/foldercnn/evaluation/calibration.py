"""Confidence that means something: temperature scaling, expected calibration error, Wilson intervals.

Temperature scaling (Guo et al., 2017) divides the logits by one number T fitted on held-out data so the
softmax probabilities match how often the model is right. It never changes which class wins.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.05, 20.0


def nll(logits, labels, temperature=1.0):
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        return float("nan")
    return F.cross_entropy(logits / temperature, labels).item()


def fit_temperature(logits, labels):
    """The T in [T_MIN, T_MAX] that minimises the NLL of softmax(logits / T): a coarse grid over log T, then
    golden-section refinement. Deterministic, and one-dimensional so it cannot overfit much.
    """
    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        return 1.0
    f = lambda log_t: nll(logits, labels, math.exp(log_t))  # noqa: E731
    grid = np.linspace(math.log(T_MIN), math.log(T_MAX), 61)
    values = [f(g) for g in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    phi = (math.sqrt(5) - 1) / 2
    a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - phi * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + phi * (hi - lo)
            fb = f(b)
    best = (lo + hi) / 2
    # never return something worse than T = 1 (the grid's neighbourhood of 1 is coarse)
    return math.exp(best) if f(best) <= f(0.0) else 1.0


def mean_confidence(logits, temperature):
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64) / temperature, dim=1).max(1).values.mean().item()


def temperature_for_confidence(logits, target):
    """The T at which the mean top probability equals `target` (it falls as T grows): bisection on log T."""
    lo, hi = math.log(T_MIN), math.log(T_MAX)
    for _ in range(50):
        mid = (lo + hi) / 2
        if mean_confidence(logits, math.exp(mid)) > target:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def choose_temperature(logits, labels):
    """Temperature for a model file: the NLL fit, but never more confident than the validation record allows.

    On a validation split the model gets (almost) all right, the NLL keeps falling as T -> 0 and the fit would
    make every prediction ~100% sure: the tutorial's failure. So sharpening (T < 1) stops at the temperature
    whose mean confidence on validation equals the lower end of the 95% Wilson interval of validation
    accuracy. The cap only limits sharpening, so the validation NLL is never worse than with T = 1.
    Returns (temperature, which rule decided it).
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) == 0:
        return 1.0, "no validation images"
    t_fit = fit_temperature(logits, labels)
    correct = int((torch.as_tensor(logits).argmax(1) == labels).sum())
    floor = min(1.0, temperature_for_confidence(logits, wilson_interval(correct, len(labels))[0]))
    if floor > t_fit:
        return floor, "sharpening capped at the lower 95% bound of validation accuracy"
    return t_fit, "negative log-likelihood fit"


def reliability_bins(confidences, correct, n_bins=10):
    """Equal-width confidence bins: [{lo, hi, count, confidence, accuracy}] (empty bins have count 0)."""
    conf, correct = np.asarray(confidences, float), np.asarray(correct, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins = []
    for b in range(n_bins):
        m = which == b
        bins.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": int(m.sum()),
                "confidence": float(conf[m].mean()) if m.any() else None,
                "accuracy": float(correct[m].mean()) if m.any() else None,
            }
        )
    return bins


def expected_calibration_error(confidences, correct, n_bins=10):
    """ECE: the count-weighted mean |accuracy - confidence| over equal-width confidence bins (0 is perfect)."""
    n = len(confidences)
    if n == 0:
        return float("nan")
    return float(
        sum(
            b["count"] / n * abs(b["accuracy"] - b["confidence"])
            for b in reliability_bins(confidences, correct, n_bins)
            if b["count"]
        )
    )


def wilson_interval(successes, n, z=1.959964):
    """95% Wilson score interval for a proportion (sound at 0% and 100%, unlike the normal approximation)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
