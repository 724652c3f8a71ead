"""User-facing errors, atomic writes (nothing a command writes is ever left half-written) and the one parser of sizes
such as "4k" or "30M"."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the CLI prints the message (what, where, what to do) and exits 2."""


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if `out` exists and may not be replaced."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out` in one rename, on error it vanishes."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_SIZE = re.compile(r"^([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmbt]?)$")
# k is 1024: context lengths are written that way ("a 128K context" holds 131072 tokens, "4k" prompts 4096).
# M, B and T are decimal: token and document budgets are ("250M tokens", "1.5B"). No size in gendistill is written
# both ways, so the one rule serves every option and recipe field.
SIZE_UNITS = {"": 1, "k": 1024, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_size(value, what: str = "a size") -> int:
    """A positive whole count from an option or a recipe field: 300, "300", "4k" -> 4096, "128K" -> 131072,
    "30M" -> 30_000_000, "1.5B" -> 1_500_000_000, 1e6 -> 1_000_000 (see SIZE_UNITS). `what` names the field in
    the error."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        match = _SIZE.match(value.strip().lower())
        if match:
            number = float(match.group(1)) * SIZE_UNITS[match.group(2)]
    whole = round(number) if number is not None and number == number and abs(number) != float("inf") else None
    if whole is None or whole < 1 or abs(number - whole) > 1e-9 * whole:  # 1.1M is 1100000.0000000002 in floats
        raise UserError(f"{what}: expected a positive whole count such as 300, 4k (= 4096) or 30M (= 30,000,000), "
                        f"got {value!r}")
    return int(whole)
