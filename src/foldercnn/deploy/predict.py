"""`foldercnn predict`: classify image files and whole folders with a model file."""

import json
import os
import re
from pathlib import Path

from PIL import Image

from ..data.decode import decode_images, walk_images
from ..data.images import ImageDecodeError
from ..errors import FolderCNNError, OptionError
from ..evaluation.overlays import explained_picture, photo
from ..files import atomic_path, check_out_dir, read_json, write_text
from ..models.onnx_model import NO_EXPLANATIONS


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


def predict_paths(classifier, paths, batch_size=64, explain_dir=None):
    """Predict every image under `paths` with a Classifier or an OnnxClassifier; returns
    (predictions, [(path, reason)] skipped). explain_dir: also write one picture per image there (write_pictures)."""
    if explain_dir is not None:
        if not classifier.explains:
            raise FolderCNNError(NO_EXPLANATIONS)
        check_out_dir(explain_dir, [p if p.is_dir() else p.parent for p in map(Path, paths)], flag="--explain")
        earlier_pictures(explain_dir)
    files, skipped = expand_paths(paths)
    array, good, bad = decode_images(files, classifier.image_size, desc="reading images")
    skipped += [(files[i], reason) for i, reason in bad]
    named = [files[i] for i in good]
    if explain_dir is None:
        return classifier.predict_arrays(array, named, batch_size), skipped
    predictions, maps = classifier.explain_arrays(array, named, batch_size)
    skipped += write_pictures(predictions, maps, explain_dir)
    return predictions, skipped


MANIFEST = ".foldercnn-explain.json"  # the pictures an earlier --explain wrote here
PICTURE = re.compile(r"\d{4,}-[^/\\]*\.png")
LEFT_BY_KILL = re.compile(r"\.(\d{4,}-[^/\\]*\.png|\.foldercnn-explain\.json)\.[^/\\]*\.tmp")


def earlier_pictures(out_dir):
    """The files an earlier --explain left in OUT_DIR (its pictures, and temporary files a kill left), to be
    replaced; refuses a folder holding anything else, so that no file of the user's is overwritten."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    listed = read_json(out_dir / MANIFEST)
    ours = {n for n in listed if isinstance(n, str) and PICTURE.fullmatch(n)} if isinstance(listed, list) else set()
    names = {p.name for p in out_dir.iterdir()} - {MANIFEST}
    leftovers = {n for n in names if LEFT_BY_KILL.fullmatch(n)}
    others = sorted(names - ours - leftovers)
    if others:
        raise OptionError(
            "explain",
            f"{out_dir} already holds files foldercnn did not write there ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose an empty or new folder",
        )
    return sorted((ours & names) | leftovers)


PICTURE_STEM_BYTES = 100  # a legal 244-byte image name, numbered and with the writer's temporary suffix, is too long


def picture_name(i, path):
    """Numbered (two folders may hold files of the same name), the image's name cut to PICTURE_STEM_BYTES."""
    stem = Path(path).stem
    while len(os.fsencode(stem)) > PICTURE_STEM_BYTES:
        stem = stem[:-1]
    return f"{i + 1:04d}-{stem}.png"


def write_pictures(predictions, maps, out_dir):
    """One PNG per prediction in OUT_DIR (the photo with where the model looked); [(path, reason)] of images that
    changed or went since they were read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in earlier_pictures(out_dir):
        (out_dir / name).unlink(missing_ok=True)
    names = [picture_name(i, p.path) for i, p in enumerate(predictions)]
    write_text(out_dir / MANIFEST, json.dumps(names))  # first: a run killed half-way is still cleaned up next time
    failed = []
    for i, p in enumerate(predictions):
        try:
            picture = explained_picture(photo(p.path), p, None if maps is None else maps[i])
        except ImageDecodeError as e:
            failed.append((p.path, f"no picture: {e}"))
            continue
        with atomic_path(out_dir / names[i]) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
    return failed


def prediction_rows(predictions, top_k=None):
    """`predict --json`: one object per image."""
    rows = []
    for p in predictions:
        row = {"path": p.path, **p.to_dict()}
        if top_k:
            row["top_k"] = [{"label": c, "probability": v} for c, v in p.top_k(top_k)]
        rows.append(row)
    return rows
