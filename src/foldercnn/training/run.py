"""A started run: where it computes (RunContext) and what it writes while it trains (RunWriter).

The loop and the probes take one RunContext instead of a dozen arguments; the writer saves history.csv and the
checkpoint after every epoch, and finds the checkpoint a run continues from.
"""

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import run_folder as rf
from ..errors import FolderCNNError
from ..events import Events
from . import checkpoint as ckpt
from .distributed import SINGLE, Ranks


class RunWriter:
    """history.csv and checkpoint.safetensors of one run folder; `RunWriter()` (no folder) writes nothing, and one
    with writes=False only reads the checkpoint (the other ranks of a torchrun launch resume from rank 0's).
    `with_history_prefix(rows)`: the same writer, those rows written first (the probe's row before fine-tuning)."""

    def __init__(
        self,
        out_dir: Path | None = None,
        identity: dict | None = None,
        files: dict | None = None,
        prefix: list | None = None,
        writes: bool = True,
    ) -> None:
        self.out_dir, self.identity, self.files, self.prefix = out_dir, identity or {}, files or {}, prefix or []
        self.writes = writes and out_dir is not None

    def history(self, rows: list) -> None:
        if self.writes and self.out_dir is not None:
            rf.write_history(self.out_dir / rf.HISTORY, self.prefix + rows)

    def checkpoint(self, info: dict, **state) -> None:
        """Save the fit's whole state (see checkpoint.save) with what identifies the run."""
        if self.writes and self.out_dir is not None:
            ckpt.save(self.out_dir / ckpt.FILE, info={**info, "identity": self.identity, "files": self.files}, **state)

    def with_history_prefix(self, rows: list) -> "RunWriter":
        return RunWriter(self.out_dir, self.identity, self.files, self.prefix + rows, self.writes)

    def resume_point(self, mode: str, events: Events):
        """The (info, tensors) of the checkpoint to continue from, or None. mode "auto" continues an interrupted
        run found in the folder (with a message), "require" needs one, "ignore" starts over, "force" continues
        even when the data, split or recipe changed (which is otherwise refused, saying what changed)."""
        path = Path(self.out_dir or ".") / ckpt.FILE
        if mode == "ignore" or self.out_dir is None or not path.is_file():
            if mode == "require":
                raise FolderCNNError(f"resume: no checkpoint in {self.out_dir} (nothing to continue)")
            return None
        info, tensors = ckpt.read(path)
        changed = [k for k in self.identity if info["identity"].get(k) != self.identity[k]]
        if changed and mode != "force":
            what = ", ".join(changed)
            if "data" in changed:
                what += f": {ckpt.describe_changes(info.get('files', {}), self.files)}"
            raise FolderCNNError(
                f"{path} belongs to a different run (changed: {what}); resume 'force' continues "
                "anyway; or write to another folder, or delete the checkpoint"
            )
        events(
            f"continuing the interrupted run in {self.out_dir} from {path.name} (epoch {info['epoch']} "
            "finished"
            + (f"; {', '.join(changed)} changed, continuing anyway" if changed else "")
            + "); delete that file to start over"
        )
        return info, tensors

    def finished(self) -> None:
        """A finished run: a later run in this folder starts afresh."""
        if self.writes and self.out_dir is not None:
            (self.out_dir / ckpt.FILE).unlink(missing_ok=True)


@dataclass
class RunContext:
    """Where and how a run computes, and where its events and files go."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    seed: int = 0
    events: Events = field(default_factory=Events)
    deadline: float | None = None  # a time.perf_counter() value: training stops there (see loop.fit)
    ranks: Ranks = SINGLE
    writer: RunWriter = field(default_factory=RunWriter)
    resume: tuple | None = None  # a checkpoint's (info, tensors) that the loop continues from

    def but(self, **changes) -> "RunContext":
        return replace(self, **changes)


def save_options(out_dir: Path, options: dict) -> None:
    """RUN_DIR/options.json: the run's options as given (what `foldercnn train` was asked)."""
    from ..files import write_text

    write_text(Path(out_dir) / rf.OPTIONS, json.dumps(options, indent=1) + "\n")
