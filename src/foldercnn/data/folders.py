"""Folders of labelled images: scan, validate, decode once into a uint8 tensor, split.

Layout: DATA_DIR/<class name>/<images, sub-folders allowed>. Nothing is ever written here.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FolderCNNError, OptionError
from . import cache
from .decode import decode_images, natural_key, walk_images  # noqa: F401 (part of this module's API)
from .images import IMAGE_EXTENSIONS, is_candidate


@dataclass
class ImageFolder:
    """What a scan of a labelled folder found (nothing decoded yet)."""

    root: Path
    classes: list
    files: list  # Paths, sorted by class then natural name order
    labels: list  # class index of each file
    skipped: list = field(default_factory=list)  # (path, reason)

    def counts(self):
        c = Counter(self.labels)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def list_class_dirs(root):
    root = Path(root)
    if not root.exists():
        raise FolderCNNError(f"folder not found: {root}")
    if not root.is_dir():
        raise FolderCNNError(f"not a folder: {root}")
    dirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(dirs, key=lambda p: natural_key(p.name))


def scan_folder(root, classes=None, min_classes=2):
    """Find class folders and their image files.

    `classes`: the class names a model already has; the folder must not hold any other class
    (a folder with fewer, e.g. a test set of two classes, is fine).
    """
    root = Path(root)
    class_dirs = list_class_dirs(root)
    if not class_dirs:
        stray = [p.name for p in root.iterdir() if p.is_file() and is_candidate(p)][:3]
        hint = (
            f" (found loose images such as {', '.join(stray)}; put each class in its own sub-folder)" if stray else ""
        )
        raise FolderCNNError(f"no class folders in {root}: expected one sub-folder per class{hint}")
    check_distinct_class_dirs(class_dirs)
    names = [p.name for p in class_dirs]
    if classes is None:
        if len(names) < min_classes:
            raise FolderCNNError(
                f"{root} has {len(names)} class folder ({names[0]}); a classifier needs at least {min_classes}"
            )
        classes = names
    else:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise FolderCNNError(
                f"{root} has class folders the model does not know: {', '.join(unknown)} "
                f"(model classes: {', '.join(classes)})"
            )
    skipped, files, labels = [], [], []
    for d in class_dirs:
        found = walk_images(d, skipped)
        if not found:
            raise FolderCNNError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        files += found
        labels += [classes.index(d.name)] * len(found)
    return ImageFolder(root, list(classes), files, labels, skipped)


def check_distinct_class_dirs(class_dirs):
    """Two class folders that are one folder (a link to another class) would make two classes of the same images."""
    seen = {}
    for d in class_dirs:
        real = d.resolve()
        if real in seen:
            raise FolderCNNError(
                f"class folders {seen[real].name} and {d.name} in {d.parent} are the same folder ({real}): two "
                "classes would hold the same images; remove the link or copy the images you mean"
            )
        seen[real] = d


def check_same_classes(train_classes, val_root, val_classes):
    if list(val_classes) != list(train_classes):
        missing = [c for c in train_classes if c not in val_classes]
        extra = [c for c in val_classes if c not in train_classes]
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"extra {', '.join(extra)}"] if extra else []
        )
        raise FolderCNNError(
            f"validation classes in {val_root} do not match the training classes: {'; '.join(parts)} "
            f"(training classes: {', '.join(train_classes)})"
        )


@dataclass
class DecodedImages:
    """Images decoded once: a uint8 NHWC tensor (in RAM or memory-mapped) + labels.

    A subset keeps the parent's tensor and a row index, so splitting never copies the pixels.
    """

    images: torch.Tensor  # (M, S, S, 3) uint8
    labels: torch.Tensor  # (N,) int64
    paths: list
    classes: list
    skipped: list  # (path, reason): everything that could not be used, with the scan's skips
    rows: torch.Tensor | None = None  # which rows of `images` belong to this set; None: all
    readahead: object | None = None  # cache.Readahead when `images` is memory-mapped from the decode cache
    stamps: list | None = None  # each path's "size:mtime_ns" as read when decoding (cache.file_stamps); None: unknown

    def prefetch(self, index):
        """Start reading the images of `index` (positions or a slice) from disk, for memory-mapped sets; `take`
        then finds them in memory."""
        if self.readahead is None:
            return
        if self.rows is None and isinstance(index, slice):
            self.readahead(range(len(self))[index])
        else:
            self.readahead((self.rows[index] if self.rows is not None else torch.as_tensor(index)).tolist())

    def __len__(self):
        return len(self.labels)

    def take(self, index):
        """uint8 images for `index` (a tensor of positions or a slice)."""
        if isinstance(index, slice):  # a contiguous chunk (final pass, validation): read it in large reads
            self.prefetch(index)
        if self.rows is not None:
            index = self.rows[index]
        return self.images[index]

    def subset(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index if self.rows is None else self.rows[index]
        picked = index.tolist()
        return DecodedImages(
            self.images,
            self.labels[index],
            [self.paths[i] for i in picked],
            self.classes,
            [],
            rows,
            self.readahead,
            None if self.stamps is None else [self.stamps[i] for i in picked],
        )

    def union(self, other):
        """This set and `other`, two subsets of one decoded set (a split's two sides), in the folder's order."""
        if other.images is not self.images or self.rows is None or other.rows is None:
            raise ValueError("union: both sets must be subsets of one decoded set")
        rows = torch.cat([self.rows, other.rows])
        order = rows.argsort().tolist()
        stamps = None if self.stamps is None or other.stamps is None else self.stamps + other.stamps
        return DecodedImages(
            self.images,
            torch.cat([self.labels, other.labels])[order],
            [(self.paths + other.paths)[i] for i in order],
            self.classes,
            [],
            rows[order],
            self.readahead,
            None if stamps is None else [stamps[i] for i in order],
        )


def decode_cached(files, size, root, desc="decoding", stamps=None):
    """decode_images through the on-disk decode cache (see cache.py); returns the same triple + hit flag."""
    if not cache.enabled() or not files:
        return (*decode_images(files, size, desc=desc), False)
    key = cache.folder_key(files, size, stamps)
    hit = cache.load(key, size, len(files))
    if hit is not None:
        return (*hit, True)
    try:
        array, tmp = cache.new_array(key, (len(files), int(size), int(size), 3))
    except OSError:  # cache folder not writable: decode in memory
        return (*decode_images(files, size, desc=desc), False)
    try:
        _, good, bad = decode_images(files, size, desc=desc, out=array)
        cache.commit(key, array, tmp, good, bad, root, size)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return (*cache.load(key, size, len(files)), False)


def load_folder(folder: ImageFolder, size, require_every_class=True):
    """Decode every image of a scanned folder at `size`; unusable files are skipped and reported."""
    stamps = cache.file_stamps(folder.files)
    array, good, bad, _ = decode_cached(folder.files, size, folder.root, f"decoding {folder.root.name}", stamps)
    labels = torch.tensor([folder.labels[i] for i in good], dtype=torch.long)
    skipped = folder.skipped + [(folder.files[i], reason) for i, reason in bad]
    if require_every_class:
        present = set(labels.tolist())
        for i, name in enumerate(folder.classes):
            if i in set(folder.labels) and i not in present:
                raise FolderCNNError(
                    f"class '{name}' in {folder.root} has no usable images "
                    f"(all {folder.labels.count(i)} failed to decode)"
                )
    if len(good) == 0:
        raise FolderCNNError(f"no usable images in {folder.root}")
    return DecodedImages(
        torch.from_numpy(array),
        labels,
        [folder.files[i] for i in good],
        folder.classes,
        skipped,
        readahead=cache.Readahead.of(array),
        stamps=[stamps[i] for i in good],
    )


def stratified_split(labels, fraction, seed):
    """Seeded split keeping class proportions; every class keeps >= 1 training image."""
    if not 0.0 < fraction < 1.0:
        raise OptionError("val_fraction", f"must be between 0 and 1, got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    train_idx, val_idx = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(fraction * len(idx)))
        n_val = min(max(n_val, 1 if len(idx) >= 2 else 0), len(idx) - 1)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def group_split(labels, groups, fraction, seed):
    """Like stratified_split, but each group of near-duplicates goes to one side.

    Per class (a group belongs to its most common class), groups are shuffled with the seed and moved to validation
    while that keeps the class's validation share within 1.5x the fraction. A group too big for that (a rendered
    sequence, a video, a photo session) is first cut into runs of consecutive images (positions follow the folder's
    sorted file names), each a quarter of the class's validation share: holding out a whole sequence would take
    every view of one subject away from training, while runs leave only the frames at a run's ends adjacent
    across the split. Returns (train positions, validation positions, classes whose groups were cut into runs).
    """
    if not 0.0 < fraction < 1.0:
        raise OptionError("val_fraction", f"must be between 0 and 1, got {fraction}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    whole = {}
    for i, gid in enumerate(torch.as_tensor(groups).tolist()):
        whole.setdefault(gid, []).append(i)
    by_class = {}
    for gid in sorted(whole):
        by_class.setdefault(int(torch.mode(labels[whole[gid]]).values), []).append(whole[gid])
    val, cut = [], []
    for c in sorted(by_class):
        n = sum(map(len, by_class[c]))
        target, limit = fraction * n, max(1.5 * fraction * n, 1)
        run = max(1, int(0.25 * target))
        units = []
        for m in by_class[c]:
            if len(m) > limit:
                units += [m[k : k + run] for k in range(0, len(m), run)]
                cut.append(c)
            else:
                units.append(m)
        taken = []
        for k in torch.randperm(len(units), generator=g).tolist():
            if len(taken) >= target:
                break
            if len(taken) + len(units[k]) <= limit and n - len(taken) - len(units[k]) >= 1:
                taken += units[k]
        val += taken
    val_idx = torch.tensor(sorted(val), dtype=torch.long)
    in_val = torch.zeros(len(labels), dtype=torch.bool)
    in_val[val_idx] = True
    return (~in_val).nonzero().flatten(), val_idx, sorted(set(cut))


def summarize_skipped(skipped, limit=10):
    lines = [f"  {path}: {reason}" for path, reason in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)
