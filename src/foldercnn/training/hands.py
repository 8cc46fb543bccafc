"""The `hands` recipe's training: hands found once per image (cached by content), their landmark features, a
standardised linear head fitted in seconds. Images without a hand are left out and counted."""

import time

import numpy as np
import torch

from ..data.hands import hands_of
from ..errors import FolderCNNError
from ..models.landmarks import hand_features
from .transfer import Features, HeadSearch, fit_head_on_features

# CGI validation hands are all easy (every weight decay scores ~99-100%): the strongest one within a point is taken,
# which made real photos' probabilities less overconfident; within half a point, one split of three (seed 2) took
# 0.1 and lost 3 points on green-screen and 2 on rps/test (benchmarks/README.md)
HAND_HEAD_SEARCH = HeadSearch(weight_decays=(0.01, 0.1, 1.0, 3.0), within=0.01)


def augmented_views(found, views, seed, noise=0.02, tilt=25.0):
    """`views` copies of the found hands' image points, each turned by a random 3-D rotation of up to `tilt`
    degrees about the wrist (a hand seen from another angle) with joint noise of `noise` x the palm's length;
    the world points get the same noise. The CGI renders show every hand from about the same side."""
    rng = np.random.default_rng(seed)
    out_points, out_world = [], []
    for _ in range(views):
        p, w = found.points.astype(np.float64).copy(), found.world.astype(np.float64).copy()
        centre = p[:, :1]
        angles = np.deg2rad(rng.uniform(-tilt, tilt, size=(len(p), 2)))
        p = centre + np.einsum("nij,nkj->nki", _rotation(angles), p - centre)
        palm = np.linalg.norm(p[:, 9, :2] - p[:, 0, :2], axis=-1)[:, None, None]
        p[..., :2] += rng.normal(0, noise, p[..., :2].shape) * palm
        wpalm = np.linalg.norm(w[:, 9] - w[:, 0], axis=-1)[:, None, None]
        w += rng.normal(0, noise, w.shape) * wpalm
        out_points.append(p)
        out_world.append(w)
    return np.concatenate(out_points), np.concatenate(out_world)


def _rotation(angles):
    """(N, 3, 3) rotations about x then y by (N, 2) angles in radians."""
    cx, sx, cy, sy = np.cos(angles[:, 0]), np.sin(angles[:, 0]), np.cos(angles[:, 1]), np.sin(angles[:, 1])
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([np.stack([one, zero, zero], -1), np.stack([zero, cx, -sx], -1), np.stack([zero, sx, cx], -1)], -2)
    ry = np.stack([np.stack([cy, zero, sy], -1), np.stack([zero, one, zero], -1), np.stack([-sy, zero, cy], -1)], -2)
    return ry @ rx


def landmark_probe(model, train, val, recipe, run):
    """Fit a LandmarkNet's standardisation and head on the hands of the training images; the weight decay is
    chosen on the validation images with a hand. Returns a FitResult like the image probe."""
    t = time.perf_counter()
    run.events.stage("hands", 0.0, "finding the hands")
    found_train, found_val = hands_of(train, run.events), hands_of(val, run.events)
    return probe_on_hands(model, (found_train, train.labels), (found_val, val.labels), recipe, run, t)


def probe_on_hands(model, train, val, recipe, run, t=None):
    """landmark_probe on hands already found: train and val are (FoundHands, labels) of every image of each side
    (the kept-landmarks job of a teaching server, training/cached_probe.py, reads them from disk)."""
    t = time.perf_counter() if t is None else t
    (found_train, labels_train), (found_val, labels_val) = train, val
    keep_train, keep_val = found_train.found, found_val.found
    for name, keep in (("training", keep_train), ("validation", keep_val)):
        run.events(
            f"hands: found in {int(keep.sum())} of {len(keep)} {name} images"
            + (f"; the {int((~keep).sum())} without one are left out" if not keep.all() else "")
        )
    if keep_train.sum() < 2 or keep_val.sum() < 1:
        raise FolderCNNError(
            "the hands recipe found too few hands to train on (see the counts above); is this a "
            "folder of hand gestures?"
        )
    hands_train, hands_val = found_train.take(keep_train), found_val.take(keep_val)
    f_train = hand_features(hands_train.points, hands_train.world)
    y_train = labels_train[torch.from_numpy(keep_train)]
    if recipe.probe_views:
        p, w = augmented_views(hands_train, recipe.probe_views, run.seed)
        f_train = np.concatenate([f_train, hand_features(p, w)])
        y_train = y_train.repeat(recipe.probe_views + 1)
    f_train, f_val = torch.from_numpy(f_train), torch.from_numpy(hand_features(hands_val.points, hands_val.world))
    with torch.no_grad():
        model.feature_mean.copy_(f_train.mean(0))
        model.feature_std.copy_(f_train.std(0).clamp_min(1e-3))
    features = Features(
        model.features(f_train),
        y_train,
        model.features(f_val),
        labels_val[torch.from_numpy(keep_val)],
        time.perf_counter() - t,
    )
    run.events(
        f"landmark features: {len(f_train)} training views, {len(f_val)} validation hands in {features.seconds:.1f}s"
    )
    return fit_head_on_features(model, features, run, HAND_HEAD_SEARCH)
