"""User-facing errors, atomic writes, the rules for replacing directories (nothing a command writes is ever left
half-written, and nothing gendistill did not create is ever deleted) and the one parser of sizes such as "4k" or "30M"."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

MARKER = ".gendistill"  # written into every directory gendistill creates; `--overwrite` replaces only those
_MARKER_TEXT = "created by gendistill: `--overwrite` may replace this directory\n"


class UserError(Exception):
    """Bad input from the user: the CLI prints the message (what, where, what to do) and exits 2."""


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text writes str, got {type(text).__name__}")
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename: readers see the old file
    or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# output directories

def mark_dir(directory: str | os.PathLike) -> None:
    """Mark `directory` as created by gendistill (what `--overwrite` checks before deleting anything)."""
    (Path(directory) / MARKER).write_text(_MARKER_TEXT)


def is_marked(directory: str | os.PathLike) -> bool:
    return (Path(directory) / MARKER).is_file()


LOCK_NAME = ".gendistill.lock"


def contents(directory: Path) -> list[Path]:
    """A directory's entries apart from gendistill's lock files (which say nothing about what it holds)."""
    return [p for p in Path(directory).iterdir() if not p.name.startswith(LOCK_NAME)]


def _protected(path: Path) -> str | None:
    """Why `path` may never be deleted, or None: the working directory, its parents, home and its parents."""
    resolved = path.expanduser().resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if resolved == cwd:
        return "it is the current directory"
    if resolved in cwd.parents:
        return "it holds the current directory"
    if resolved == home or resolved in home.parents:
        return "it is your home directory or holds it"
    return None


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail before any work if `out` may not be (re)placed: a file, or an existing directory without --overwrite,
    or one --overwrite may not delete (not created by gendistill, or the current/home directory or a parent)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file, not a directory; choose another path")
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it")
    if out.exists():
        check_deletable(out)
    return out


def check_deletable(out: Path) -> None:
    why = _protected(out)
    if why:
        raise UserError(f"refusing to delete {out}: {why}; choose a dedicated output directory")
    if not is_marked(out) and contents(out):
        raise UserError(f"refusing to delete {out}: gendistill did not create it (no {MARKER} marker inside), so it "
                        "may hold your files; choose another output directory or remove it yourself")


def _make_dir(path: Path) -> None:
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700 directories; outputs get the usual permissions


def remove_tree(path: Path) -> None:
    """Delete a directory or file that gendistill wrote (callers check `check_deletable` for user-named paths)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces `out` in one rename, on error it vanishes.
    The result carries the gendistill marker; an existing `out` is replaced only under the rules of
    `check_output_dir`."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        _make_dir(tmp)
        yield tmp
        mark_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)  # a directory onto an empty directory: allowed
            os.replace(tmp, out)
            remove_tree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        remove_tree(tmp)
        raise


# ----------------------------------------------------------------------------------------------------------------
# an exclusive lock per output directory

class DirLock:
    """Exclusive lock on a directory (filelock's fcntl lock on `<dir>/.gendistill.lock`, which the kernel releases
    when the holder dies), plus `<dir>/.gendistill.lock.json` saying who holds it (pid, host, start). A holder killed
    with -9 leaves that json behind: the next run takes the lock over and says whose it was."""

    def __init__(self, directory: str | os.PathLike, what: str = "run directory"):
        self.directory, self.what = Path(directory), what
        self.path, self.info = self.directory / LOCK_NAME, self.directory / f"{LOCK_NAME}.json"
        self._lock = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.info.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "DirLock":
        from filelock import FileLock, Timeout

        self._lock = FileLock(str(self.path), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            h = self._holder()
            who = f"process {h.get('pid', '?')} on host {h.get('host', '?')} (since {h.get('started', '?')})"
            raise UserError(f"{self.what} {self.directory} is in use by {who}; wait for that run to end or stop it "
                            "(two runs writing one directory would mix their outputs)") from None
        stale = self._holder()
        if stale:
            here = stale.get("host") == socket.gethostname()
            state = ("which is no longer running" if here and not _alive(stale.get("pid"))
                     else "which no longer holds it")
            print(f"gendistill: warning: taking over the lock of {self.directory} left by process {stale.get('pid')} "
                  f"on host {stale.get('host')} {state}", file=sys.stderr)
        atomic_write_json(self.info, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.info.unlink()
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------------------------------
# model references

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_model_ref(ref: str | os.PathLike, role: str, need_tokenizer: bool = False,
                    need_config: bool = True) -> None:
    """A model given as a local directory or a hub id `org/name`: fail with a plain message when it is neither (a
    missing directory would otherwise reach the hub client and come back as "Repo id must be in the form ...")."""
    path = Path(os.path.expanduser(str(ref)))
    if path.exists():
        if not path.is_dir() or (need_config and not (path / "config.json").is_file()):
            raise UserError(f"{role} {ref} is not a model directory (no config.json)")
        if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{role} {ref}: the model directory holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                            "save the tokenizer next to the weights (tokenizer.save_pretrained)")
        return
    import re

    text = str(ref)
    if os.path.isabs(text) or text.startswith((".", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise UserError(f"could not load {role} {ref}: no such directory (and not a hub id such as Qwen/Qwen3-0.6B)")


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
