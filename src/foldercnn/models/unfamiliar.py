"""Unfamiliarity: how far an image's penultimate features lie from those of the training images.

Class-conditional Gaussians with one shared covariance, shrunk towards a scaled identity with the
Ledoit-Wolf weight (Lee et al. 2018); the score is the smallest squared Mahalanobis distance to a class mean.
Up to FULL_RANK_MAX feature dimensions the precision matrix is kept whole; above, its top LOW_RANK
eigen-directions are kept exactly and the rest share their mean variance, so the model file holds
classes*D + D*rank floats instead of D*D.

The threshold is the 0.99 quantile of *cluster-held-out* validation scores: each class's training and
validation features are cut into k-means clusters, and each cluster's validation images are scored by a fit
that never saw that cluster. A random validation split holds near-copies of training images (frames of one
video, renders of one hand); the plain "95% of validation passes" rule then flags almost every truly new image
(measured on Rock-Paper-Scissors: ~99% of the test set). Only training and validation features are used:
no test folder ever changes the threshold. The cluster-held-out fits subtract the left-out rows from sums over all
rows (exact) and take their top eigen-directions by a few steps of subspace iteration from the whole fit's: their
threshold is that of fits from scratch to ~1e-4, in a quarter of the time (benchmarks/fit_parts.py).

What it is good for (measured, see README "Unfamiliar images"): telling that images come from another
domain than the training folder (CGI hands vs real photos: AUROC ~1.0). It is a weak detector of wrong
answers within one domain; the calibrated "uncertain" flag is the better one there.

In the model file: tensors PREFIX + means (C, D), basis (D, r), weights (r,); metadata section
{"score", "threshold", "rule", "feature_dim", "rank", "inv_rest", "shrinkage"}.
"""

import math
from dataclasses import dataclass

import torch

PREFIX = "unfamiliar."
SCORE = "mahalanobis"
FULL_RANK_MAX = 256
LOW_RANK = 64
QUANTILE = 0.99
CLUSTERS_PER_CLASS = 5
RULE = f"{QUANTILE:g} quantile of cluster-held-out validation scores ({CLUSTERS_PER_CLASS} k-means clusters per class)"


@dataclass
class Unfamiliarity:
    means: torch.Tensor  # (C, D) class means
    basis: torch.Tensor  # (D, r) eigen-directions of the shrunk shared covariance
    weights: torch.Tensor  # (r,) precision along each direction (minus inv_rest when low rank)
    inv_rest: float = 0.0  # precision of the directions left out (0 when full rank)
    threshold: float = math.inf
    rule: str = RULE
    shrinkage: float = 0.0

    @property
    def feature_dim(self):
        return self.means.shape[1]

    @property
    def rank(self):
        return self.basis.shape[1]

    def score(self, features):
        """(N, D) features -> (N,) min over classes of the squared Mahalanobis distance."""
        x = torch.as_tensor(features).float()
        if not len(x):
            return torch.empty(0)
        return mahalanobis_min(x, self.means, self.basis, self.weights, self.inv_rest)

    def unfamiliarity(self, features):
        """(N,) score / threshold: above 1 means unfamiliar."""
        return self.score(features) / self.threshold

    def tensors(self):
        return {
            PREFIX + "means": self.means.contiguous(),
            PREFIX + "basis": self.basis.contiguous(),
            PREFIX + "weights": self.weights.contiguous(),
        }

    def metadata(self):
        return {
            "score": SCORE,
            "threshold": self.threshold,
            "rule": self.rule,
            "feature_dim": self.feature_dim,
            "rank": self.rank,
            "inv_rest": self.inv_rest,
            "shrinkage": self.shrinkage,
        }

    @classmethod
    def from_file(cls, tensors, section):
        return cls(
            tensors[PREFIX + "means"].float(),
            tensors[PREFIX + "basis"].float(),
            tensors[PREFIX + "weights"].float(),
            float(section["inv_rest"]),
            float(section["threshold"]),
            section["rule"],
            float(section.get("shrinkage", 0.0)),
        )


def mahalanobis_min(x, means, basis, weights, inv_rest):
    """(N, D) features -> (N,) min over the classes of the squared Mahalanobis distance to each class mean, with
    the covariance's eigen-directions `basis` weighted by `weights` and `inv_rest` on the rest. Plain tensor
    operations: the ONNX export traces this same function."""
    diff = (x @ basis)[:, None, :] - (means @ basis)[None]  # (N, C, r)
    d = (diff.square() * weights).sum(-1)
    if inv_rest:
        d = d + inv_rest * (x[:, None, :] - means[None]).square().sum(-1)
    return d.min(1).values


def expected_tensors(num_classes, feature_dim, rank):
    """{name: shape} of the tensors a model file with an unfamiliarity section must hold."""
    return {
        PREFIX + "means": (num_classes, feature_dim),
        PREFIX + "basis": (feature_dim, rank),
        PREFIX + "weights": (rank,),
    }


def default_rank(feature_dim):
    return feature_dim if feature_dim <= FULL_RANK_MAX else LOW_RANK


def ledoit_wolf_shrinkage(centred):
    """Ledoit-Wolf (2004) weight a of mu*I in (1-a)*S + a*mu*I for centred rows (N, D)."""
    x = centred.double()
    s = x.T @ x / len(x)
    fourth = float((x.square().sum(1) ** 2).mean())
    return _ledoit_wolf(len(x), float(torch.trace(s)), float((s * s).sum()), fourth, s.shape[0])


def _ledoit_wolf(n, trace, fro2, mean_fourth, d):
    """The Ledoit-Wolf weight from S = R^T R / n's trace and ||S||_F^2 and the mean of ||r||^4 over the centred
    rows r: the sum of (x^2)^T (x^2) that their formula needs, taken row by row."""
    mu = trace / d
    beta = (mean_fourth - fro2) / n
    delta = fro2 - 2 * mu * trace + mu * mu * d  # ||S - mu I||_F^2
    return float(min(beta, delta) / delta) if delta > 0 else 0.0


def _shrunk(n, d, trace, fro2, mean_fourth, lam, vecs, rank):
    """(basis (D, rank), weights (rank,), inv_rest, a) of the shrunk covariance (1 - a) S + a mu I from S's
    trace, ||S||_F^2, the rows' mean ||r||^4 and S's top eigenpairs (lam descending, vecs (D, len(lam)): all D when
    rank >= D, else at least `rank` or every non-zero one): the top `rank` directions exactly, with their
    precisions (minus inv_rest when low rank); the other D - rank share their mean variance, whose inverse is
    inv_rest (the shrunk matrix's trace is S's, so that mean needs no other eigenvalue)."""
    a = _ledoit_wolf(n, trace, fro2, mean_fourth, d)
    mu = trace / d
    floor = 1e-12 * mu + 1e-30
    k = min(rank, len(lam))
    top = ((1 - a) * lam[:k] + a * mu).clamp_min(floor)
    if rank >= d:
        return vecs.float().contiguous(), (1.0 / top).float(), 0.0, a
    rest_sum = trace - float(top.sum()) - (rank - k) * a * mu  # S's directions beyond k have a * mu, like the rest
    inv_rest = float(1.0 / max(rest_sum / (d - rank), floor))
    basis = torch.zeros(d, rank, dtype=torch.float64)
    basis[:, :k] = vecs[:, :k]
    weights = torch.zeros(rank, dtype=torch.float64)
    weights[:k] = 1.0 / top - inv_rest
    return basis.float().contiguous(), weights.float(), inv_rest, a


# Rows are taken CHUNK at a time, in float64: a fit holds D x D matrices, never float64 copies of all N features
# (at 64,000 images of 256-d features those copies took ~0.5 GB per fit, and the threshold makes ~15 fits).
CHUNK = 4096
OVERSAMPLE = 32  # directions followed beyond the rank kept, in a leave-out fit's subspace iteration
ITERATIONS = 4  # steps of that iteration from the whole fit's directions (benchmarks/README.md)


def _top_eigen(matrix, count, start=None):
    """The top `count` eigenpairs of a symmetric positive semi-definite matrix, descending: exactly, or from
    `start`'s columns (the directions of a fit on nearly the same rows) by ITERATIONS steps of subspace iteration
    (in float32: the same threshold, 1.2x faster) and a Rayleigh-Ritz step in the matrix's precision."""
    if start is None or start.shape[1] >= matrix.shape[0]:
        lam, vecs = torch.linalg.eigh(matrix)
        return lam.flip(0)[:count], vecs.flip(1)[:, :count]
    single, q = matrix.float(), start.float()
    for _ in range(ITERATIONS):
        q = torch.linalg.qr(single @ q).Q
    q = q.to(matrix.dtype)
    lam, v = torch.linalg.eigh(q.T @ matrix @ q)
    return lam.flip(0)[:count], (q @ v).flip(1)[:, :count]


class _Sums:
    """Sums over the rows idx (default: all) of x, read CHUNK rows at a time, from which a fit without some of the
    rows subtracts theirs (the cluster-held-out fits of the threshold, ~15 per model): per class the count and the
    sum of the rows, each row's squared norm, and X X^T (fewer rows than dimensions and a low rank: S's non-zero
    eigenvalues from the n x n Gram matrix) or X^T X."""

    def __init__(self, x, y, num_classes, rank, idx=None, by_gram=None):
        self.x, self.y, self.rank = x, y, rank
        self.idx = torch.arange(len(x)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        n, d = len(self.idx), x.shape[1]
        self.by_gram = (n < d and rank < d) if by_gram is None else by_gram
        self.sums = torch.zeros(num_classes, d, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.float64)
        self.square = torch.empty(n, dtype=torch.float64)
        self.second = None if self.by_gram else torch.zeros(d, d, dtype=torch.float64)
        for k in range(0, n, CHUNK):
            rows = x[self.idx[k : k + CHUNK]].double()
            labels = y[self.idx[k : k + CHUNK]]
            self.sums.index_add_(0, labels, rows)
            self.counts += torch.bincount(labels, minlength=num_classes)
            self.square[k : k + len(rows)] = rows.square().sum(1)
            if self.second is not None:
                self.second += rows.T @ rows
        self.gram = None
        if self.by_gram:
            rows = x[self.idx].double()
            self.gram = rows @ rows.T

    def fit(self, drop=None, start=None):
        """(Unfamiliarity, start) without the rows at positions `drop` of idx, exact or from `start` (what the fit
        on every row returned: S's top rank + OVERSAMPLE eigenvectors, or the Gram matrix's; see _top_eigen)."""
        drop = torch.empty(0, dtype=torch.long) if drop is None else drop
        keep = torch.ones(len(self.idx), dtype=torch.bool)
        keep[drop] = False
        pos = keep.nonzero().flatten()
        x, y = self.x[self.idx[pos]], self.y[self.idx[pos]]
        gone, gone_labels = self.x[self.idx[drop]].double(), self.y[self.idx[drop]]
        sums = self.sums.index_add(0, gone_labels, -gone)
        counts = self.counts - torch.bincount(gone_labels, minlength=len(self.counts))
        means = sums / counts[:, None]
        n, d = len(pos), x.shape[1]
        along = _rows_dot_means(x, means)  # (n, C)
        own = along.gather(1, y[:, None]).flatten()
        norms = self.square[pos] - 2 * own + (means * means).sum(1)[y]  # ||x - its class mean||^2, per row
        trace, fourth = float(norms.sum() / n), float((norms * norms).mean())
        count = min(self.rank + OVERSAMPLE, d)
        if self.by_gram:  # the centred rows' Gram matrix: X X^T - X m^T - m X^T + m m^T, m the rows' class means
            gram = self.gram[pos][:, pos]
            cross = along[:, y]
            gram -= cross
            gram -= cross.T
            gram += (means @ means.T)[y][:, y]
            gram /= n
            lam, u = _top_eigen(gram, count, None if start is None else start[pos])
            fro2 = float((gram * gram).sum())
            nonzero = int((lam > 1e-10 * lam[0].clamp_min(1e-300)).sum())
            k = min(nonzero, self.rank)
            vecs = (x.double() - means[y]).T @ (u[:, :k] / torch.sqrt(n * lam[:k]))  # S's, from the Gram's
            lam, directions = lam[:k], u
        else:
            second = self.second - gone.T @ gone if len(drop) else self.second
            cov = (second - (means.T * counts) @ means) / n
            lam, vecs = _top_eigen(cov, d if self.rank >= d else count, start)
            fro2 = float((cov * cov).sum())
            directions = vecs
        basis, weights, inv_rest, a = _shrunk(n, d, trace, fro2, fourth, lam, vecs, self.rank)
        return Unfamiliarity(means.float(), basis, weights, inv_rest, shrinkage=a), directions


def _rows_dot_means(x, means):
    return torch.cat([x[k : k + CHUNK].double() @ means.T for k in range(0, len(x), CHUNK)])


def _fit_gaussians(x, y, num_classes, rank, idx=None):
    """Class means and the shrunk shared covariance of the rows idx (default: all) of x."""
    return _Sums(x, y, num_classes, rank, idx).fit()[0]


def _kmeans(z, k, seed=0, iters=30):
    g = torch.Generator().manual_seed(seed)
    centres = z[torch.randperm(len(z), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)
        for j in range(len(centres)):
            if (assign == j).any():
                centres[j] = z[assign == j].mean(0)
    return torch.cdist(z, centres).argmin(1)


def held_out_scores(x, y, xv, yv, num_classes, rank, clusters_per_class=CLUSTERS_PER_CLASS, seed=0, whole=None):
    """Validation scores, each from a fit that left out the k-means cluster (of its class's training +
    validation features, L2-normalised) the validation image falls in. whole: the _Sums of x and the directions
    of its fit on every row (made if None)."""
    cx, cv = torch.empty(len(x), dtype=torch.long), torch.empty(len(xv), dtype=torch.long)
    for c in range(num_classes):
        it, iv = (y == c).nonzero().flatten(), (yv == c).nonzero().flatten()
        z = torch.nn.functional.normalize(torch.cat([x[it], xv[iv]]), dim=1)
        if len(z) == 0:
            continue
        a = _kmeans(z, min(clusters_per_class, len(z)), seed) + c * clusters_per_class
        cx[it], cv[iv] = a[: len(it)], a[len(it) :]
    if whole is None:
        sums = _Sums(x, y, num_classes, rank)
        whole = sums, sums.fit()[1]
    sums, start = whole
    start = start if rank < x.shape[1] else None  # full rank: exact (D <= FULL_RANK_MAX)
    out = []
    for h in cv.unique():
        if len(y[cx != h].unique()) < num_classes:  # a class would vanish from the fit: skip this cluster
            continue
        out.append(sums.fit((cx == h).nonzero().flatten(), start)[0].score(xv[cv == h]))
    return torch.cat(out) if out else torch.empty(0)


def fit(train_features, train_labels, val_features, val_labels, num_classes=None, rank=None, seed=0):
    """Fit the Gaussians on the training features; the threshold on the validation features only.

    rank: None chooses full rank up to FULL_RANK_MAX dimensions, LOW_RANK above.
    """
    x, y = torch.as_tensor(train_features).float(), torch.as_tensor(train_labels).long()
    xv, yv = torch.as_tensor(val_features).float(), torch.as_tensor(val_labels).long()
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if any(int((y == c).sum()) == 0 for c in range(num_classes)):
        raise ValueError("every class needs training features to fit the unfamiliarity score")
    rank = min(default_rank(x.shape[1]) if rank is None else int(rank), x.shape[1])
    sums = _Sums(x, y, num_classes, rank)
    fitted, start = sums.fit()
    val = held_out_scores(x, y, xv, yv, num_classes, rank, seed=seed, whole=(sums, start))
    rule = RULE
    if len(val) == 0:  # no cluster could be left out (tiny data): fall back to the plain validation scores
        val, rule = fitted.score(xv), f"{QUANTILE:g} quantile of validation scores"
    threshold = float(torch.quantile(val.double(), QUANTILE)) if len(val) else math.inf
    fitted.threshold = threshold if math.isfinite(threshold) and threshold > 0 else math.inf
    fitted.rule = rule
    return fitted


def refitted(first, first_train_features, train_features, train_labels, num_classes=None):
    """The score of a model refitted on all its images (training's `refit`), whose own features have no held-out
    images: the Gaussians on its training features; the threshold `first`'s (fitted on the split's first model,
    thresholded on images that model never saw) as a multiple of the QUANTILE of first's own training scores,
    times the QUANTILE of the refitted model's training scores."""
    x, y = torch.as_tensor(train_features).float(), torch.as_tensor(train_labels).long()
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    own = float(torch.quantile(first.score(torch.as_tensor(first_train_features).float()).double(), QUANTILE))
    if not (math.isfinite(first.threshold) and own > 0):
        raise ValueError("the first model's score has no usable threshold to carry over")
    ratio = first.threshold / own
    fitted = _fit_gaussians(x, y, num_classes, min(first.rank, x.shape[1]))
    fitted.threshold = ratio * float(torch.quantile(fitted.score(x).double(), QUANTILE))
    fitted.rule = (
        f"the first model's {first.rule} were {ratio:.3g}x its training scores' {QUANTILE:g} quantile; "
        "the same multiple of this model's"
    )
    return fitted
