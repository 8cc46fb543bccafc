"""The linear probe on features kept per image file (models/feature_store.py): with a frozen pretrained backbone
and no random views, an image's features never change, so they are computed once, when the image arrives, and a
training job only splits, fits the head, the temperature and the unfamiliarity score, and writes the run folder.

The same run folder and model file as `train_folder` with the same recipe (job.py); what differs: the
near-duplicate check of the split looks at 48-pixel thumbnails kept with the features instead of the decoded
images, and features are computed in float32 (the probe's own pass uses the run's precision). `Backbone` keeps the
model loaded between jobs (deploy/teach_worker.py keeps one per teaching server). The `hands` recipe's
`HandBackbone` keeps MediaPipe Hands loaded instead and the hand found in each image: its random views are of the
landmarks, drawn by each job, so they too need nothing but what is kept.
"""

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import run_folder as rf
from ..data.captures import burst_group_ids, merge_groups
from ..data.decode import decode_images
from ..data.duplicates import file_digests, near_duplicate_groups
from ..data.folders import group_split, scan_folder, summarize_skipped
from ..data.hands import FoundHands, describe_finder, find_hands, shared_finder
from ..data.hands_cache import RECORD, _from_record, _record
from ..errors import FolderCNNError
from ..events import Events
from ..files import check_out_dir
from ..models.feature_store import THUMB, FeatureStore, backbone_key
from ..models.file import save_model
from ..models.inference import landmark_logits
from ..models.landmarks import hand_features
from ..models.preprocess import decode_size, eval_batches
from ..models.registry import create_model, get_spec
from ..models.summary import summary
from .finish import calibrate, describe_calibration, fit_unfamiliarity, model_metadata, unfamiliarity_sample
from .hands import probe_on_hands
from .run import RunContext, save_options
from .transfer import Features, HeadSearch, fit_head_on_features

CHUNK = 8  # images decoded and passed through the backbone at a time (peak memory: benchmarks/README.md)


def cacheable(recipe, options):
    """Whether a run's features are a function of each file alone: a frozen pretrained image backbone, clean and
    mirrored views only, or the hands found in each image (their random views are of the landmarks, drawn at
    training time); the validation split held out of the folder."""
    if recipe.fine_tune or options.val_dir is not None or not recipe.linear_probe or recipe.tta:
        return False
    kind = get_spec(recipe.model).input
    return kind == "hand-landmarks" or (kind == "image" and recipe.pretrained and recipe.probe_views == 0)


@dataclass
class Labelled:
    """The part of a split the model file's data summary reads (training/prepare.py): labels, paths, classes."""

    labels: torch.Tensor
    paths: list
    classes: list
    rows: torch.Tensor | None = None  # positions in the folder's Records; None: all, in order

    def __len__(self):
        return len(self.labels)

    def subset(self, index):
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index if self.rows is None else self.rows[index]
        return Labelled(self.labels[index], [self.paths[i] for i in index.tolist()], self.classes, rows)


@dataclass
class Records:
    """The records of the usable files of a folder, stacked: clean and mirrored features, thumbnails."""

    files: Labelled
    clean: torch.Tensor
    flip: torch.Tensor
    thumbs: np.ndarray
    skipped: list
    computed: int  # records computed now (the others were on disk)
    digests: tuple = ()  # each file's sha256, in files order
    backbone: object = None  # the Backbone that read them (it remembers the last folder's groups)


def store_for(recipe, store_dir):
    """The FeatureStore of a recipe's backbone under store_dir (no model is loaded)."""
    spec = get_spec(recipe.model)
    finder = describe_finder() if spec.input == "hand-landmarks" else None  # a new finder finds other hands
    key, described = backbone_key(
        recipe.model, recipe.model_args, recipe.image_size, recipe.mean, recipe.std, spec.fit, finder
    )
    return FeatureStore(Path(store_dir) / key, described)


def backbone_for(recipe, store_dir):
    """The Backbone that keeps a cacheable recipe's features: image features, or the hands found."""
    kind = HandBackbone if get_spec(recipe.model).input == "hand-landmarks" else Backbone
    return kind(recipe, store_dir)


class Backbone:
    """A recipe's pretrained backbone, loaded once, and the FeatureStore of its features under `store_dir`."""

    def __init__(self, recipe, store_dir, device="cpu"):
        spec = get_spec(recipe.model)
        self.recipe, self.device = recipe, torch.device(device)
        self.size = decode_size(recipe.image_size, spec.fit)
        self.store = store_for(recipe, store_dir)
        self.dim = self._load()
        self.computed = 0  # records this process computed (what the cache saved is the rest)
        self._digests = {}  # (path, size, mtime_ns) -> sha256: an unchanged file is read once
        self._summaries = {}
        self._groups = (None, None)  # (paths and digests, the split's groups) of the last folder grouped

    def _load(self):
        """Load what computes a record; returns the width of its `clean` vector."""
        recipe = self.recipe
        self.model = create_model(recipe.model, 2, pretrained=True, **recipe.model_args).to(self.device).eval()
        return self.model.head.in_features

    def warm_up(self):
        """The first head fit of a process pays for PyTorch's first calls (seconds): pay it before the first Train."""
        g = torch.Generator().manual_seed(0)
        f = torch.randn(64, self.dim, generator=g)
        y = torch.arange(64) % 2
        fit_head_on_features(self.new_model(2), Features(f, y, f[:8], y[:8]), RunContext(), HeadSearch(steps=60))

    def groups(self, records):
        """The split's groups of records, remembered for the folder as it is: the estimate after the last capture
        and the Train that follows group the same files once (seconds at 1,500 images: benchmarks/README.md)."""
        key = (tuple(map(str, records.files.paths)), records.digests)
        if self._groups[0] != key:
            paths = records.files.paths
            groups = merge_groups(near_duplicate_groups(records.thumbs, paths), burst_group_ids(paths))
            self._groups = (key, np.asarray(groups))
        return self._groups[1]

    def digests(self, paths):
        out = [None] * len(paths)
        todo = []
        for i, p in enumerate(paths):
            try:
                st = Path(p).stat()
            except OSError:
                continue
            key = (str(p), st.st_size, st.st_mtime_ns)
            out[i] = self._digests.get(key)
            if out[i] is None:
                todo.append((i, key))
        for (i, key), digest in zip(todo, file_digests([k[0] for _, k in todo])):
            out[i] = digest
            if digest is not None:
                self._digests[key] = digest
        return out

    def records(self, folder, log=print):
        """Records of every image of a scanned folder (data/folders.ImageFolder), computing the missing ones."""
        digests = self.digests(folder.files)
        got = [self.store.get(d, self.dim) if d is not None else None for d in digests]
        missing = [i for i, (d, r) in enumerate(zip(digests, got)) if d is not None and r is None]
        skipped = [(folder.files[i], "could not be read") for i, d in enumerate(digests) if d is None]
        if missing:
            log(f"features: computing {len(missing)} of {len(digests)} images (the others are kept)")
        for start in range(0, len(missing), CHUNK):
            part = missing[start : start + CHUNK]
            for i, record in self._compute([folder.files[i] for i in part], [digests[i] for i in part], skipped):
                got[part[i]] = record
        keep = [i for i, r in enumerate(got) if r is not None]
        files = Labelled(
            torch.tensor([folder.labels[i] for i in keep], dtype=torch.long),
            [folder.files[i] for i in keep],
            folder.classes,
        )
        return Records(
            files,
            torch.from_numpy(np.stack([got[i]["clean"] for i in keep])) if keep else torch.empty(0, self.dim),
            torch.from_numpy(np.stack([got[i].get("flip", got[i]["clean"]) for i in keep]))
            if keep
            else torch.empty(0, self.dim),
            np.stack([got[i]["thumb"] for i in keep]) if keep else np.empty((0, THUMB, THUMB, 3), np.uint8),
            skipped,
            len(missing),
            tuple(digests[i] for i in keep),
            self,
        )

    def _compute(self, paths, digests, skipped):
        """Decode, compute each image's record (_records_of), store."""
        array, good, bad = decode_images(paths, self.size, desc=None)
        skipped.extend((paths[i], reason) for i, reason in bad)
        if not len(good):
            return []
        out = []
        for i, record in zip(good, self._records_of(np.ascontiguousarray(array[: len(good)]))):
            self.store.put(digests[i], record["clean"], record.get("flip"), record["thumb"])
            self.computed += 1
            out.append((i, record))
        return out

    @torch.no_grad()
    def _records_of(self, pixels):
        """Records of decoded images: the backbone's features of each and of its mirror image (float32, eval
        mode), its thumbnail."""
        clean, flip = [], []
        for x in eval_batches(torch.from_numpy(pixels), self.recipe.mean, self.recipe.std, self.device):
            clean.append(self.model.features(x).float().cpu())
            flip.append(self.model.features(x.flip(-1)).float().cpu())
        clean, flip = torch.cat(clean).numpy(), torch.cat(flip).numpy()
        thumbs = thumbnails(pixels)
        return [{"clean": clean[k], "flip": flip[k], "thumb": thumbs[k]} for k in range(len(pixels))]

    def new_model(self, num_classes):
        """The backbone's architecture with its pretrained weights and a fresh head for `num_classes`."""
        recipe = self.recipe
        model = create_model(recipe.model, num_classes, pretrained=False, **recipe.model_args)
        head = {id(model.head.weight), id(model.head.bias)}
        head_names = {n for n, p in model.named_parameters() if id(p) in head}
        state = {k: v for k, v in self.model.state_dict().items() if k not in head_names}
        model.load_state_dict(state, strict=False)
        return model.to(self.device).eval()

    def summary(self, model, num_classes):
        if num_classes not in self._summaries:
            self._summaries[num_classes] = summary(model, self.recipe.image_size)
        return self._summaries[num_classes]

    def fit(self, model, records, train, val, options, ctx):
        """The probe on the records of the split's two sides (Labelled with rows): returns (FitResult, validation
        logits and labels of the images the model answers, the unfamiliarity score or None)."""
        features = Features(
            torch.cat([records.clean[train.rows], records.flip[train.rows]]),
            torch.cat([train.labels, train.labels]),
            records.clean[val.rows],
            val.labels,
        )
        # the unfamiliarity score needs no head: fitted on a second thread meanwhile (benchmarks/README.md)
        said = []
        sample = unfamiliarity_sample(train, options.seed, said.append)
        with ThreadPoolExecutor(1) as pool:
            fitting = pool.submit(
                fit_unfamiliarity,
                records.clean[sample.rows],
                sample.labels,
                features.val,
                val.labels,
                len(train.classes),
                said.append,
            )
            with one_thread_when_small(features.train):
                result = fit_head_on_features(model, features, ctx, HeadSearch())
            model.load_state_dict(result.best_state)
            with torch.no_grad():
                val_logits = model.head(features.val)
            unfamiliarity = fitting.result()
        for line in said:
            ctx.events(line)
        return result, val_logits, val.labels, unfamiliarity

    def estimate_features(self, records):
        """(features of the rows the leave-one-burst-out estimate can answer, which rows those are)."""
        return records.clean, np.ones(len(records.clean), bool)


def thumbnails(pixels):
    """(N, THUMB, THUMB, 3) uint8 thumbnails of (N, H, W, 3) uint8 pixels, for the split's near-duplicate check."""
    pixels = torch.as_tensor(np.ascontiguousarray(pixels))
    thumbs = F.adaptive_avg_pool2d(pixels.permute(0, 3, 1, 2).float(), THUMB).round().clamp(0, 255)
    return thumbs.to(torch.uint8).permute(0, 2, 3, 1).numpy()


class HandBackbone(Backbone):
    """The hands recipe's: the hand finder loaded once; a record is the hand found in the image (data/hands_cache.py's
    layout: a hand or its absence), so a job only draws the landmarks' views and fits the head."""

    def _load(self):
        self.model = None
        self.finder = shared_finder()
        self.finder.find(np.zeros((64, 64, 3), np.uint8))  # loads the finder's two models
        return RECORD

    def warm_up(self):
        found = FoundHands.empty(4)
        found.stage[:], found.world[:] = 0, np.random.default_rng(0).normal(0, 0.04, found.world.shape)
        found.points[..., :2] = found.world[..., :2] + 0.5
        labels = torch.tensor([0, 1, 0, 1])
        probe_on_hands(self.new_model(2), (found, labels), (found, labels), self.recipe, RunContext())

    def _records_of(self, pixels):
        """The hand found in each image (in this process: one that loaded the finder never forks), its thumbnail."""
        found = find_hands(pixels, pool_from=len(pixels) + 1)
        thumbs = thumbnails(pixels)
        return [{"clean": _record(found, k), "thumb": thumbs[k]} for k in range(len(pixels))]

    def new_model(self, num_classes):
        return create_model(self.recipe.model, num_classes)

    def fit(self, model, records, train, val, options, ctx):
        hands = records_to_hands(records.clean.numpy())
        val_hands = hands.take(val.rows.numpy())
        result = probe_on_hands(
            model, (hands.take(train.rows.numpy()), train.labels), (val_hands, val.labels), self.recipe, ctx
        )
        model.load_state_dict(result.best_state)
        val_logits, _ = landmark_logits(model, val_hands)
        answered = torch.from_numpy(val_hands.found)
        ctx.events("unfamiliarity: a photo without a hand found is what this model calls unfamiliar")
        return result, val_logits[answered], val.labels[answered], None

    def estimate_features(self, records):
        hands = records_to_hands(records.clean.numpy())
        f = torch.from_numpy(hand_features(hands.points[hands.found], hands.world[hands.found]))
        return (f - f.mean(0)) / f.std(0).clamp_min(1e-3) if len(f) > 1 else f, hands.found


def records_to_hands(records):
    """FoundHands of (N, RECORD) hand records."""
    found = FoundHands.empty(len(records))
    for i, r in enumerate(records):
        _from_record(found, i, r)
    return found


SMALL_HEAD = 1 << 20  # feature values below which a second thread costs more than it gives (benchmarks/README.md)


@contextlib.contextmanager
def one_thread_when_small(features):
    """A small head fit on one thread: its steps are too short to share, and a busy second core stalls them."""
    threads = torch.get_num_threads()
    if features.numel() < SMALL_HEAD:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class CachedJob:
    """What model_metadata (finish.py) reads of a job."""

    data_dir: Path
    options: object
    recipe: object
    ctx: RunContext
    skipped: list
    fine_tuned_epochs: int = 0


def split_records(records, options, events):
    """(train, val) positions: the held-out split of job.py's hold_out, near-duplicates judged on thumbnails."""
    groups = split_groups(records) if options.split == "groups" else torch.arange(len(records.files))
    train_idx, val_idx, _ = group_split(records.files.labels, groups, options.held_out, options.seed)
    if len(val_idx) == 0:
        raise FolderCNNError("too few images to hold out a validation split")
    events(f"validation: {len(train_idx)} images train, {len(val_idx)} validate (seed {options.seed})")
    return torch.as_tensor(train_idx, dtype=torch.long), torch.as_tensor(val_idx, dtype=torch.long)


def train_cached(data_dir, out_dir, options, backbone, events=None):
    """The recipe's probe on DATA_DIR through the backbone's feature store; writes the run folder OUT_DIR and
    returns the model file's path. Emits the events train_folder does (stage, log, done)."""
    t0 = time.perf_counter()
    events = events or Events()
    recipe = options.make_recipe()
    if not cacheable(recipe, options) or recipe.model != backbone.recipe.model:
        raise FolderCNNError(f"recipe '{recipe.name}' with these options cannot train on kept features")
    check_out_dir(out_dir, [data_dir])
    events.emit("start", options=options.to_dict(), out_dir=str(out_dir))
    events.stage("data", 0.0, "reading the kept features")
    folder = scan_folder(data_dir)
    records = backbone.records(folder, events)
    if records.skipped:
        events(f"skipped {len(records.skipped)} file(s):\n{summarize_skipped(records.skipped)}")
    missing = [c for i, c in enumerate(folder.classes) if not (records.files.labels == i).any()]
    if missing:
        raise FolderCNNError(f"no usable images in the class folder(s) {', '.join(missing)} of {data_dir}")
    train_idx, val_idx = split_records(records, options, events)
    train, val = records.files.subset(train_idx), records.files.subset(val_idx)
    seconds = {"data": time.perf_counter() - t0}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_options(Path(out_dir), options.to_dict())

    t1 = time.perf_counter()
    ctx = RunContext(backbone.device, "fp32", options.seed, events)
    model = backbone.new_model(len(folder.classes))
    result, val_logits, val_labels, unfamiliarity = backbone.fit(
        model, records, train, val, options, ctx.but(events=events.span(0.2, 0.7))
    )
    seconds["train"] = time.perf_counter() - t1
    events.stage("calibration", 0.7, "calibrating")
    calibration = calibrate(val_logits, val_labels, options.uncertain_below)
    events(describe_calibration(calibration))
    events.stage("report", 0.9, "writing the model file and the report")
    job = CachedJob(Path(data_dir), options, recipe, ctx, records.skipped)
    timing = {"data_seconds": seconds["data"], "train_seconds": seconds["train"]}
    out_dir = Path(out_dir)
    model_path = save_model(
        out_dir / rf.MODEL, model, model_metadata(job, train, val, result, calibration, timing), unfamiliarity
    )
    events.emit("saved", model=str(model_path), progress=0.95)  # a teaching server swaps it in now
    from ..evaluation.report import write_report  # matplotlib: imported by the first job, after its swap
    from ..plots import training_curves

    rf.write_history(out_dir / rf.HISTORY, result.history)
    training_curves(
        result.history,
        out_dir / rf.CURVES,
        title=f"{recipe.name} recipe: {len(train)} training images, {len(val)} validation",
    )
    events(f"report: {write_report(out_dir, model_summary=backbone.summary(model, len(folder.classes)))}")
    best = result.history[result.best_epoch - 1]
    events.emit(
        "done",
        model=str(model_path),
        best_epoch=result.best_epoch,
        val_accuracy=best["val_accuracy"],
        interrupted=False,
        features_computed=records.computed,
        progress=1.0,
    )
    return model_path


RIDGE = 1.0  # the ridge penalty of the estimate's linear head, on unit-length features


def split_groups(records):
    """The split's groups: a Teach-panel burst, near-duplicates, any other image alone (Backbone.groups)."""
    return records.backbone.groups(records)


def left_out_guesses(features, labels, num_classes, groups):
    """The class a ridge-regression head (one-hot targets, unit-length features and a bias) fitted without each
    group guesses for that group's images, for every group at once: with A = (K + RIDGE * I)^-1 of the kernel K and
    alpha = A Y, the fit without group G predicts Y_G - A_GG^-1 alpha_G on it (the ridge leave-group-out identity),
    so one inverse serves every group instead of one fit per group."""
    x = F.normalize(features.double(), dim=1)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    targets = F.one_hot(torch.as_tensor(labels), num_classes).double()
    inverse = torch.linalg.inv(x @ x.T + RIDGE * torch.eye(len(x), dtype=x.dtype))
    alpha = inverse @ targets
    guesses = np.empty(len(x), dtype=np.int64)
    for g in np.unique(groups):
        rows = torch.from_numpy(np.flatnonzero(groups == g))
        predicted = targets[rows] - torch.linalg.solve(inverse[rows][:, rows], alpha[rows])
        guesses[rows.numpy()] = predicted.argmax(1).numpy()
    return guesses


def burst_estimates(records):
    """{class: {"accuracy", "groups", "bursts", "frames"}}: each group of a class (a burst, with its look-alikes:
    the split's groups) left out in turn, a ridge-regression head on the features of every other image, the share
    of the left-out frames it gets right. bursts: the class's Teach-panel bursts (a file of its own counts as one);
    accuracy None for a class with fewer than two groups (leaving its only group out leaves nothing to learn)."""
    labels = records.files.labels.numpy()
    classes = records.files.classes
    out = {c: {"accuracy": None, "groups": 0, "bursts": 0, "frames": 0} for c in classes}
    if len(set(labels.tolist())) < 2:
        return out
    groups = split_groups(records)
    bursts = burst_group_ids(records.files.paths)
    features, answered = records.backbone.estimate_features(records)
    guesses = np.full(len(labels), -1)  # a frame without a hand found is not right
    if answered.sum() >= 2:
        guesses[answered] = left_out_guesses(features, labels[answered], len(classes), groups[answered])
    for c, name in enumerate(classes):
        own = labels == c
        n_groups = len(set(groups[own].tolist()))
        out[name].update(groups=n_groups, bursts=len(set(bursts[own].tolist())))
        if n_groups >= 2:
            out[name].update(accuracy=float((guesses[own] == c).mean()), frames=int(own.sum()))
    return out
