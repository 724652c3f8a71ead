"""Stage checkpoints: `checkpoints/step-NNNNNNN/` with model, optimiser, scheduler and RNG states and the step
(which is also the data position: sequence k of a stage is always the same window of the packed stream).

A checkpoint directory is written under a temporary name and renamed into place when complete, so a process killed
while writing leaves the previous checkpoint as the latest one; temporaries (dot-names) are never read.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

from gendistill.io import atomic_dir

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


def write_files(directory: Path, state: dict, summary: dict) -> None:
    """The files of one checkpoint (a separate function so tests can interrupt it half-way)."""
    torch.save(state, directory / "state.pt")
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


def load(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
