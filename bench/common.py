"""Shared helpers for the benchmark scripts: environment record, result files, a printed table."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import torch


def environment() -> dict:
    """gendistill bench's environment record (versions, device, date) plus the command line."""
    from gendistill.bench.run import environment as bench_environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"command": " ".join(shlex.quote(a) for a in sys.argv), **bench_environment(device)}


def write_result(path: str | Path, result: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return "-" if x is None else str(x)
