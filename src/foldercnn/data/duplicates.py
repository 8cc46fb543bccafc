"""Near-duplicate images: identical files, and copies that were resized, re-compressed or slightly cropped.

Each image becomes a 16x16 RGB thumbnail with its mean removed and scaled to unit length (so brightness and
contrast changes cancel out). Pairs whose thumbnails have a cosine of at least `CANDIDATE` are then compared
crop-aware: the best cosine between one image and 18 crops of the other (90% and 95% of the side, at 9 positions),
because a slightly cropped copy is shifted and zoomed; a near-duplicate scores at least `THRESHOLD`.
Why this and not a 64-bit difference hash: on the CGI Rock-Paper-Scissors set a dHash links 2,483 of 2,520 images
into one chain. Measured by benchmarks/duplicates.py on that set: 99.8% of planted copies (resized, JPEG q40,
cropped up to 5% per side) found, no pair of images of different classes; without the crop-aware step, 93% at the
same zero false pairs.
Neighbouring frames of one rendered or filmed sequence do pair up: they are near-duplicates, and the group-aware
validation split keeps them on one side so validation accuracy does not flatter.

Pairing is a chunked matrix product (O(N^2)); the crop-aware step costs most where many images are alike (CGI
renders of one hand: about 500 images/s on 2 cores; real photos: several thousand).
"""

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLD = 0.97
CANDIDATE = 0.85  # the lowest whole-image cosine of a planted copy cropped 5% per side was 0.87
THUMB = 16
CROP_SCALES = (0.95, 0.9)
_CHUNK = 2048
_CROP_CHUNK = 256  # images whose 18 crops are made at once (each chunk's crops are held twice while stacked)


def _unit(x):
    """(N, 3, s, s) float -> (N, 3*THUMB*THUMB) zero-mean unit vectors."""
    x = F.adaptive_avg_pool2d(x, THUMB).flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def _small(images, side=None):
    """uint8 NHWC chunk -> float NCHW, shrunk to `side` pixels (crops are taken from this)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float()
    return x if side is None else F.adaptive_avg_pool2d(x, side)


def descriptors(images):
    """(N, H, W, 3) uint8 images (tensor or array) -> (N, 768) float32 unit vectors."""
    images = torch.as_tensor(images)
    out = torch.empty(len(images), 3 * THUMB * THUMB)
    for start in range(0, len(images), _CHUNK):
        out[start : start + _CHUNK] = _unit(_small(images[start : start + _CHUNK]))
    return out


def crop_descriptors(images, side=48):
    """(N, H, W, 3) uint8 -> (N, 18, 768): crops at CROP_SCALES, 3 x 3 positions each, of a `side`-pixel copy."""
    images = torch.as_tensor(images)
    out = torch.empty(len(images), 9 * len(CROP_SCALES), 3 * THUMB * THUMB)
    for start in range(0, len(images), _CROP_CHUNK):
        x = _small(images[start : start + _CROP_CHUNK], side)
        crops = []
        for scale in CROP_SCALES:
            c = int(round(side * scale))
            offsets = (0, (side - c) // 2, side - c)
            crops += [_unit(x[:, :, y : y + c, x0 : x0 + c]) for y in offsets for x0 in offsets]
        out[start : start + len(x)] = torch.stack(crops, 1)
    return out


def _best_crop_match(rows, crops, cols, whole):
    """max over k of crops[rows[n], k] . whole[cols[n]], one small matrix product per distinct row."""
    out = torch.empty(len(rows))
    order = torch.argsort(rows, stable=True)
    starts = torch.searchsorted(rows[order], rows[order].unique())
    bounds = starts.tolist() + [len(rows)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        sel = order[lo:hi]
        out[sel] = (whole[cols[sel]] @ crops[rows[sel[0]]].T).amax(1)
    return out


def refine_pairs(pairs, a_images, a, b_images=None, b=None):
    """Crop-aware scores for candidate pairs, crop descriptors computed only for the images involved."""
    if not pairs:
        return torch.empty(0)
    i = torch.tensor([p[0] for p in pairs])
    j = torch.tensor([p[1] for p in pairs])
    if b_images is None:  # pairs within one set: one crop descriptor per image involved, on either side
        b = a
        used, local = torch.cat([i, j]).unique(return_inverse=True)
        a_crops = b_crops = crop_descriptors(torch.as_tensor(a_images)[used])
        i_local, j_local = local[: len(i)], local[len(i) :]
    else:
        used_a, i_local = i.unique(return_inverse=True)
        used_b, j_local = j.unique(return_inverse=True)
        a_crops = crop_descriptors(torch.as_tensor(a_images)[used_a])
        b_crops = crop_descriptors(torch.as_tensor(b_images)[used_b])
    # in chunks: all pairs at once held (pairs, 768) floats three times (780 MB at 74,000 pairs: benchmarks/README.md)
    whole = torch.cat([(a[i[k : k + _CHUNK]] * b[j[k : k + _CHUNK]]).sum(-1) for k in range(0, len(i), _CHUNK)])
    return torch.maximum(
        whole, torch.maximum(_best_crop_match(i_local, a_crops, j, b), _best_crop_match(j_local, b_crops, i, a))
    )


def near_duplicate_pairs(images, threshold=THRESHOLD):
    """Enough near-duplicate pairs (i, j, score), i < j, to connect every group: candidates whose whole images
    already match are taken as they are, and only those that would join two different groups are re-scored
    crop-aware (in a CGI sequence, most frame pairs are already linked through neighbours)."""
    a = descriptors(images)
    candidates = similar_pairs(a, threshold=CANDIDATE)
    sure = [p for p in candidates if p[2] >= threshold]
    ids = group_ids(len(a), sure)
    unsure = [p for p in candidates if p[2] < threshold and ids[p[0]] != ids[p[1]]]
    score = refine_pairs(unsure, images, a)
    return sure + [(i, j, s) for (i, j, _), s in zip(unsure, score.tolist()) if s >= threshold]


def matches_against(images, reference, threshold=THRESHOLD):
    """For each of `images`, its best near-duplicate in `reference`: a list of (i, reference index, score)."""
    a, b = descriptors(images), descriptors(reference)
    candidates = similar_pairs(a, b, CANDIDATE)
    score = refine_pairs(candidates, images, a, reference, b)
    best = {}
    for (i, j, _), s in zip(candidates, score.tolist()):
        if s >= threshold and s > best.get(i, (None, -1.0))[1]:
            best[i] = (j, s)
    return [(i, j, s) for i, (j, s) in sorted(best.items())]


def similar_pairs(a, b=None, threshold=THRESHOLD):
    """Pairs (i, j, cosine) with cosine >= threshold: within `a` (i < j) or, with `b`, between a[i] and b[j]."""
    pairs = []
    other = a if b is None else b
    for start in range(0, len(a), _CHUNK):
        sim = a[start : start + _CHUNK] @ other.T
        if b is None:  # each pair once, never an image with itself
            sim = torch.triu(sim, diagonal=start + 1)
        i, j = (sim >= threshold).nonzero(as_tuple=True)
        pairs += zip((i + start).tolist(), j.tolist(), sim[i, j].tolist())
    return pairs


def file_digests(paths):
    """sha256 of each file's bytes (None where unreadable)."""
    digests = []
    for p in paths:
        h = hashlib.sha256()
        try:
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digests.append(h.hexdigest())
        except OSError:
            digests.append(None)
    return digests


def group_ids(n, pairs):
    """Connected components of the pair graph: an int64 array, one group id per image (singletons included)."""
    from scipy.sparse import coo_matrix  # scipy comes with scikit-learn
    from scipy.sparse.csgraph import connected_components

    i = np.array([p[0] for p in pairs], dtype=np.int64)
    j = np.array([p[1] for p in pairs], dtype=np.int64)
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def exact_pairs(paths):
    """Pairs (i, j, 1.0) of files with identical bytes."""
    first = {}
    pairs = []
    for j, d in enumerate(file_digests(paths)):
        if d is None:
            continue
        if d in first:
            pairs.append((first[d], j, 1.0))
        else:
            first[d] = j
    return pairs


def near_duplicate_groups(images, paths=None, threshold=THRESHOLD):
    """Group id per image: near-duplicate thumbnails and (when `paths` are given) byte-identical files."""
    pairs = near_duplicate_pairs(images, threshold=threshold)
    if paths is not None:
        pairs += exact_pairs(paths)
    return group_ids(len(images), pairs)


def groups_of(ids):
    """Lists of member positions for every group with more than one member, largest first."""
    members = {}
    for i, g in enumerate(ids.tolist()):
        members.setdefault(g, []).append(i)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: (-len(m), m[0]))
