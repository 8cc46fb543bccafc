"""`foldercnn predict`: classify image files and whole folders with a model file."""

from pathlib import Path

from ..data.decode import decode_images, walk_images
from ..errors import FolderCNNError


def expand_paths(paths):
    """Images named directly, plus every image file under named folders (recursive, natural order)."""
    found, skipped = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found += walk_images(p, skipped)
        elif p.exists():
            found.append(p)
        else:
            raise FolderCNNError(f"not found: {p}")
    return found, skipped


def predict_paths(classifier, paths, batch_size=64):
    """Predict every image under `paths` with a Classifier or an OnnxClassifier; returns
    (predictions, [(path, reason)] skipped)."""
    files, skipped = expand_paths(paths)
    array, good, bad = decode_images(files, classifier.image_size, desc="reading images")
    skipped += [(files[i], reason) for i, reason in bad]
    return classifier.predict_arrays(array, [files[i] for i in good], batch_size), skipped


def prediction_rows(predictions, top_k=None):
    """`predict --json`: one object per image."""
    rows = []
    for p in predictions:
        row = {"path": p.path, **p.to_dict()}
        if top_k:
            row["top_k"] = [{"label": c, "probability": v} for c, v in p.top_k(top_k)]
        rows.append(row)
    return rows
