"""The recipes that ship with gendistill (package data, so an installed wheel has them): `paper.yaml` (the paper's
four stages on Qwen3-0.6B), `tiny.yaml` (every stage on a random tiny model, seconds on a CPU), `demo/` (the world
teacher's training and the demo's distillation, per scale), `ablations/` (ablation specs), `data/` (the tiny
recipe's text and chat records) and `lm_eval_tasks/` (the GPU demo world's QA as lm-eval task files).

A recipe or spec argument is a file path, or when no such file exists the name of a bundled one: `tiny`,
`paper.yaml`, `demo/teacher-cpu`, `ablations/world-gpu.yaml` (the `.yaml` and a leading `recipes/` are optional).
"""
from __future__ import annotations

from pathlib import Path

from gendistill.io import UserError

ROOT = Path(__file__).resolve().parent


def bundled(name: str | Path) -> Path | None:
    """The bundled file `name` names (relative to this folder, `.yaml` optional), or None."""
    text = str(name).replace("\\", "/")
    text = text.removeprefix("recipes/")
    if not text or text.startswith(("/", "../")) or "/../" in text:
        return None
    for candidate in (text, f"{text}.yaml"):
        path = ROOT / candidate
        if path.is_file():
            return path
    return None


def names() -> list[str]:
    """The bundled recipes and specs (`demo/teacher-cpu.yaml`, ...), for error messages."""
    return sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.yaml") if "lm_eval_tasks" not in p.parts)


def resolve(arg: str | Path, what: str = "recipe") -> Path:
    """A path that exists, else the bundled file of that name; else a UserError listing the bundled ones."""
    path = Path(arg)
    if path.is_file():
        return path
    found = bundled(arg)
    if found is not None:
        return found
    raise UserError(f"{what} file {arg} does not exist, and no bundled {what} has that name; bundled: "
                    f"{', '.join(names())}")
