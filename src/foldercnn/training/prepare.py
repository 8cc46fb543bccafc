"""The training data of a run: scan and decode once, hold a validation split out (or read a validation folder)."""

from pathlib import Path

import torch

from ..data.captures import burst_group_ids, merge_groups, parse_capture
from ..data.duplicates import groups_of, near_duplicate_groups
from ..data.folders import check_same_classes, group_split, load_folder, scan_folder, summarize_skipped
from ..errors import FolderCNNError
from ..models.preprocess import decode_size
from ..models.registry import get_spec


def prepare_data(data_dir, recipe, options, events=print):
    """(train, val, skipped): the training (and validation) images decoded once, at the recipe's size; without a
    validation folder a split is held out of DATA_DIR as options.split says."""
    folder = scan_folder(data_dir)
    size = decode_size(recipe.image_size, get_spec(recipe.model).fit)
    if options.val_dir is not None:
        val_folder = scan_folder(options.val_dir, min_classes=1)
        check_same_classes(folder.classes, options.val_dir, val_folder.classes)
        train, val = load_folder(folder, size), load_folder(val_folder, size)
        skipped = train.skipped + val.skipped
        events(f"validation: {len(val)} images from {options.val_dir}")
    else:
        everything = load_folder(folder, size)
        train, val = hold_out(everything, data_dir, options, events)
        skipped = everything.skipped
    if skipped:
        events(f"skipped {len(skipped)} file(s):\n{summarize_skipped(skipped)}")
    return train, val, skipped


def hold_out(everything, data_dir, options, events):
    """(train, val) of decoded images: a stratified, seeded share held out. With split "groups", near-duplicates
    (burst frames, augmented copies, neighbouring renders, the frames of one Teach-panel burst) stay on one side,
    or validation accuracy, the temperature and the unfamiliarity threshold all flatter the model."""
    grouped = options.split == "groups"
    groups = (
        merge_groups(near_duplicate_groups(everything.images, everything.paths), burst_group_ids(everything.paths))
        if grouped
        else torch.arange(len(everything))
    )
    train_idx, val_idx, cut = group_split(everything.labels, groups, options.held_out, options.seed)
    if len(val_idx) == 0:
        raise FolderCNNError(f"too few images in {data_dir} to hold out a validation split")
    train, val = everything.subset(train_idx), everything.subset(val_idx)
    kept = ""
    if grouped:
        dup_groups = groups_of(groups)
        kept = f"; {len(dup_groups)} groups of near-duplicates ({sum(map(len, dup_groups))} images) kept on one side"
    how = "default " if options.val_fraction is None else ""
    events(
        f"validation: a stratified {options.held_out:.0%} of {data_dir} held out ({how}val_fraction, seed "
        f"{options.seed}): {len(train)} images train, {len(val)} validate{kept}"
    )
    if cut:
        names = ", ".join(everything.classes[c] for c in cut)
        events(
            f"note: long sequences of near-duplicates in {names} were cut into runs of consecutive images; "
            f"the frames at the ends of a run have neighbours on the other side"
        )
    return train, val


def held_out_bursts(val):
    """{"val_bursts": {class: Teach-panel bursts among its validation images}} when validation holds captures
    (what the held-out figure rests on: frames of one burst are near-twins), else {}."""
    bursts = {c: set() for c in val.classes}
    for path, label in zip(val.paths, val.labels.tolist()):
        parsed = parse_capture(Path(path).name)
        if parsed is not None:
            bursts[val.classes[label]].add((str(Path(path).parent), parsed[0]))
    return {"val_bursts": {c: len(b) for c, b in bursts.items()}} if any(bursts.values()) else {}


def data_summary(data_dir, options, train, val, skipped, max_listed=50):
    """What the model was trained on, for the model file and the report."""
    counts = {c: [int((train.labels == i).sum()), int((val.labels == i).sum())] for i, c in enumerate(train.classes)}
    how = (
        f"the folder {options.val_dir}"
        if options.val_dir is not None
        else (
            f"a stratified{', near-duplicate-aware' if options.split == 'groups' else ''} "
            f"{options.held_out:.0%} held out of the training folder"
        )
    )
    return {
        "train_dir": str(data_dir),
        "validation": how,
        "counts": counts,
        **held_out_bursts(val),
        "n_skipped": len(skipped),
        "skipped": [{"path": str(p), "reason": r} for p, r in skipped[:max_listed]],
    }
