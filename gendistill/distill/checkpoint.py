"""Stage checkpoints: `checkpoints/step-NNNNNNN/` with model, optimiser, scheduler and RNG states and the step
(which is also the data position: sequence k of a stage is always the same window of the packed stream).

A checkpoint directory is written under a temporary name and renamed into place when complete, so a process killed
while writing leaves the previous checkpoint as the latest one; temporaries (dot-names) are never read. `state.pt`'s
sha256 (hashed while it is written) sits beside it in `state.pt.sha256`; `load_latest` skips a checkpoint whose bytes
no longer match (a truncated or damaged file) with a warning and resumes from the newest intact one.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import sys
from pathlib import Path

import torch

from gendistill.io import UserError, atomic_dir, sha256_file

_NAME = re.compile(r"^step-(\d{7,})$")


def checkpoint_dir(stage_dir: Path, step: int) -> Path:
    return Path(stage_dir) / "checkpoints" / f"step-{step:07d}"


def list_checkpoints(stage_dir: Path) -> list[tuple[int, Path]]:
    root = Path(stage_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "state.pt").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(stage_dir: Path) -> Path | None:
    found = list_checkpoints(stage_dir)
    return found[-1][1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _HashingWriter:
    """A file that hashes what is written to it: the checksum costs no second read of a large state.pt."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_files(directory: Path, state: dict, summary: dict) -> None:
    """The files of one checkpoint (a separate function so tests can interrupt it half-way)."""
    with open(directory / "state.pt", "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
    (directory / "state.pt.sha256").write_text(writer.sha.hexdigest() + "\n")
    (directory / "trainer_state.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def save(stage_dir: Path, step: int, state: dict, summary: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then drop all but the newest `keep` (the new one is never dropped)."""
    target = checkpoint_dir(stage_dir, step)
    with atomic_dir(target, overwrite=True) as tmp:
        write_files(tmp, state, summary)
    for _, old in list_checkpoints(stage_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in (Path(stage_dir) / "checkpoints").glob(".step-*.tmp"):  # from a process killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    return target


def load(path: Path, verify: bool = True) -> dict:
    """A checkpoint's state; ValueError when its state.pt does not match the recorded checksum or cannot be read."""
    path = Path(path) / "state.pt"
    recorded = path.with_name("state.pt.sha256")
    if verify and recorded.is_file() and sha256_file(path) != recorded.read_text().strip():
        raise ValueError(f"{path}: checksum mismatch (the file was truncated or changed after it was written)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged zip/pickle fails in many ways
        raise ValueError(f"{path}: unreadable ({type(err).__name__}: {err})") from err


def load_latest(stage_dir: Path) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest intact checkpoint, warning about each damaged one skipped; (None, None) if the
    stage has none. UserError when every checkpoint is damaged (nothing safe to resume from)."""
    found = list_checkpoints(stage_dir)
    damaged = []
    for _, path in reversed(found):
        try:
            state = load(path)
        except ValueError as err:
            damaged.append(str(err))
            print(f"gendistill: warning: skipping damaged checkpoint {path.name}: {err}", file=sys.stderr)
            continue
        if damaged:
            print(f"gendistill: warning: resuming from {path.name}, the newest intact checkpoint", file=sys.stderr)
        return path, state
    if damaged:
        raise UserError(f"every checkpoint of {stage_dir} is damaged ({'; '.join(damaged)}); retrain the stage with "
                        f"--from-stage {Path(stage_dir).name.split('-', 1)[-1]}")
    return None, None
