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
no test folder ever changes the threshold.

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
    return _ledoit_wolf(s, (x.square().sum(1) ** 2).mean(), len(x))


def _ledoit_wolf(cov, mean_fourth, n):
    """The Ledoit-Wolf weight from S = R^T R / n and the mean of ||r||^4 over the centred rows r: the sum of
    (x^2)^T (x^2) that their formula needs, taken row by row."""
    d = cov.shape[0]
    mu = torch.diagonal(cov).sum() / d
    beta = (mean_fourth - (cov * cov).sum()) / n
    delta = ((cov - mu * torch.eye(d, dtype=cov.dtype)) ** 2).sum()
    return float(min(beta, delta) / delta) if delta > 0 else 0.0


# Rows are taken CHUNK at a time, in float64: a fit holds D x D matrices, never float64 copies of all N features
# (at 64,000 images of 256-d features those copies took ~0.5 GB per fit, and the threshold makes ~15 fits).
CHUNK = 4096


def _chunks(idx):
    return (idx[k : k + CHUNK] for k in range(0, len(idx), CHUNK))


def _class_means(x, y, idx, num_classes):
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for j in _chunks(idx):
        sums.index_add_(0, y[j], x[j].double())
        counts += torch.bincount(y[j], minlength=num_classes)
    return sums / counts[:, None]


def _scatter(x, y, idx, means):
    """S = R^T R / n and the mean of ||r||^4, r = a row minus its class mean, over the rows idx."""
    d = x.shape[1]
    s, fourth = torch.zeros(d, d, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for j in _chunks(idx):
        r = x[j].double() - means[y[j]]
        s += r.T @ r
        fourth += (r.square().sum(1) ** 2).sum()
    return s / len(idx), fourth / len(idx)


def _fit_gaussians(x, y, num_classes, rank, idx=None):
    """Class means and the shrunk shared covariance of the rows idx (default: all) of x."""
    idx = torch.arange(len(x)) if idx is None else idx
    means = _class_means(x, y, idx, num_classes)
    d = x.shape[1]
    if len(idx) < d and rank < d:  # fewer images than dimensions (e.g. taught from a few photos): n x n is faster
        basis, weights, inv_rest, a = _low_rank_from_gram(x[idx].double() - means[y[idx]], rank)
    else:
        cov, fourth = _scatter(x, y, idx, means)
        basis, weights, inv_rest, a = _from_covariance(cov, fourth, len(idx), rank)
    return Unfamiliarity(means.float(), basis, weights, inv_rest, shrinkage=a)


def _from_covariance(cov, mean_fourth, n, rank):
    """(basis (D, rank), weights (rank,), inv_rest, a) of the shrunk covariance (1 - a) S + a mu I, S = R^T R / n:
    its top `rank` eigen-directions exactly, with their precisions (minus inv_rest when low rank); the others
    share their mean variance, whose inverse is inv_rest."""
    d = cov.shape[0]
    mu = torch.diagonal(cov).sum() / d
    a = _ledoit_wolf(cov, mean_fourth, n)
    cov = (1 - a) * cov + a * mu * torch.eye(d, dtype=cov.dtype)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp_min(1e-12 * float(mu) + 1e-30), evecs.flip(1)
    if rank >= d:
        basis, weights, inv_rest = evecs, 1.0 / evals, 0.0
    else:  # the top `rank` directions exactly; the other D - rank share their mean variance
        inv_rest = float(1.0 / evals[rank:].mean())
        basis, weights = evecs[:, :rank], 1.0 / evals[:rank] - inv_rest
    return basis.float().contiguous(), weights.float(), inv_rest, a


def _low_rank_from_gram(centred, rank):
    """What _from_covariance computes — the top `rank` eigen-directions of (1 - a) S + a mu I, S = X^T X / n, with
    their precisions minus inv_rest, and inv_rest from the mean of the other eigenvalues — from the n x n Gram
    matrix X X^T / n, which shares S's non-zero eigenvalues: for 60 images of 1280-d features, a 60 x 60
    eigen-decomposition instead of 1280 x 1280 (the fits of the cluster-held-out threshold took ~4.5 s there).
    S has at most n non-zero eigenvalues; the other D - n directions of the shrunk matrix all have a * mu."""
    x = centred
    n, d = x.shape
    gram = x @ x.T / n
    trace = torch.trace(gram)
    mu = trace / d
    s_fro2 = (gram * gram).sum()  # ||S||_F^2
    beta = ((x.square().sum(1) ** 2).sum() / n - s_fro2) / n  # the terms of ledoit_wolf_shrinkage, via rows
    delta = s_fro2 - 2 * mu * trace + mu * mu * d
    a = float(min(beta, delta) / delta) if delta > 0 else 0.0
    lam, u = torch.linalg.eigh(gram)
    lam, u = lam.flip(0), u.flip(1)
    nonzero = int((lam > 1e-10 * lam[0].clamp_min(1e-300)).sum())
    lam, u = lam[:nonzero], u[:, :nonzero]
    floor = 1e-12 * float(mu) + 1e-30
    evals = torch.cat([(1 - a) * lam + a * mu, (a * mu).expand(d - nonzero)]).clamp_min(floor)
    inv_rest = float(1.0 / evals[rank:].mean())
    k = min(rank, nonzero)
    basis = torch.zeros(d, rank, dtype=x.dtype)
    basis[:, :k] = x.T @ u[:, :k] / torch.sqrt(n * lam[:k])  # S's eigenvectors from the Gram matrix's
    weights = 1.0 / evals[:rank] - inv_rest  # zero beyond k: those directions have a * mu, like the rest
    weights[k:] = 0.0
    return basis.float().contiguous(), weights.float(), inv_rest, a


def _kmeans(z, k, seed=0, iters=30):
    g = torch.Generator().manual_seed(seed)
    centres = z[torch.randperm(len(z), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(z, centres).argmin(1)
        for j in range(len(centres)):
            if (assign == j).any():
                centres[j] = z[assign == j].mean(0)
    return torch.cdist(z, centres).argmin(1)


def held_out_scores(x, y, xv, yv, num_classes, rank, clusters_per_class=CLUSTERS_PER_CLASS, seed=0):
    """Validation scores, each from a fit that left out the k-means cluster (of its class's training +
    validation features, L2-normalised) the validation image falls in."""
    cx, cv = torch.empty(len(x), dtype=torch.long), torch.empty(len(xv), dtype=torch.long)
    for c in range(num_classes):
        it, iv = (y == c).nonzero().flatten(), (yv == c).nonzero().flatten()
        z = torch.nn.functional.normalize(torch.cat([x[it], xv[iv]]), dim=1)
        if len(z) == 0:
            continue
        a = _kmeans(z, min(clusters_per_class, len(z)), seed) + c * clusters_per_class
        cx[it], cv[iv] = a[: len(it)], a[len(it) :]
    out = []
    for h in cv.unique():
        keep = (cx != h).nonzero().flatten()
        if len(y[keep].unique()) < num_classes:  # a class would vanish from the fit: skip this cluster
            continue
        out.append(_fit_gaussians(x, y, num_classes, rank, keep).score(xv[cv == h]))
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
    fitted = _fit_gaussians(x, y, num_classes, rank)
    val = held_out_scores(x, y, xv, yv, num_classes, rank, seed=seed)
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
