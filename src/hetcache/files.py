"""Output files written whole or not at all, and output folders checked before long work.

Every file goes to a temporary file beside the target, then a rename: a crash, a kill or a full disk mid-write
leaves the old file (or none), never a cut one. The temporary name is `.NAME.<pid>-<random>.part` in the target's
folder, so the rename stays on one file system and a later run can tell a leftover of a dead process (removed:
`remove_stale`) from a file another running process is still writing (kept).

A write that fails (a full disk, a read-only file system, no permission) becomes one `UserError` line naming the
path and the reason; `check_writable` finds the same problems before a command loads a model.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from hetcache.errors import UserError

PART_SUFFIX = ".part"
# Leftovers of this module: `.NAME.<pid>-<8 hex>.part` (and `.NAME.<8 hex>.part`, from before the pid was kept).
_PART = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[0-9a-f]{8}\.part$")
# A disk with less free space than this cannot hold any output worth waiting for: "disk full".
MIN_FREE_BYTES = 1 << 20
PROBE_BYTES = 4096  # one block: what `check_writable` writes (and removes) to find a full disk or a quota
_FULL = {errno.ENOSPC, errno.EDQUOT}
_REASONS = {
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EFBIG: "the file is larger than this process may write",
}


def temporary_path(path: Path) -> Path:
    """A fresh temporary name beside `path` (same folder, hidden, ending in .part, naming this process)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}")


def write_error(path: str | os.PathLike, error: OSError) -> UserError:
    """The one-line UserError for a failed write of `path`: "disk full" when it is, else the system's reason."""
    if error.errno in _FULL:
        return UserError(f"cannot write {path}: disk full: free some space or write to another disk")
    reason = _REASONS.get(error.errno) or error.strerror or str(error) or type(error).__name__
    return UserError(f"cannot write {path}: {reason}: choose a folder you can write to")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on any error it is removed. An OSError
    (full disk, read-only folder, ...) comes out as `write_error`'s UserError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_error(path, error) from error
    remove_stale(path.parent, names=[path.name])
    temp = temporary_path(path)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise write_error(path, error) from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def save_figure(figure: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Save a matplotlib figure as PNG atomically (`kwargs` go to `savefig`)."""
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", **kwargs)


# ------------------------------------------------------------------------------------------------ leftovers
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale(path: Path) -> bool:
    """Whether `path` is a temporary file of this module whose process is gone (or that names none)."""
    match = _PART.match(path.name)
    if match is None:
        return False
    return match["pid"] is None or not _alive(int(match["pid"]))


def remove_stale(folder: str | os.PathLike, *, names: Iterable[str] | None = None,
                 recursive: bool = False) -> list[Path]:
    """Remove the temporary files that killed processes left in `folder` (in its subfolders too with
    `recursive`; only those of the targets `names` when given). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [f".{_glob_escape(name)}.*{PART_SUFFIX}" for name in names] if names is not None else [
        f".*{PART_SUFFIX}"]
    removed = []
    for pattern in patterns:
        for part in (folder.rglob(pattern) if recursive else folder.glob(pattern)):
            if part.is_file() and is_stale(part):
                with contextlib.suppress(OSError):
                    part.unlink()
                    removed.append(part)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# ------------------------------------------------------------------------------------------------ checks
def check_not_inputs(outputs: Iterable[str | os.PathLike], inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """UserError when an output would replace one of the `inputs` ({role: path}): the same file by any name (a
    link, `./x.mp4` for `x.mp4`)."""
    for output in map(Path, outputs):
        for role, given in inputs.items():
            if given is None or not output.exists() or not Path(given).is_file():
                continue
            if os.path.samefile(output, given):
                raise UserError(f"the output {output} is the {role} {given}: writing it would replace the source: "
                                "choose another output path")


def check_output_folder(folder: str | os.PathLike, names: Iterable[str] = (),
                        inputs: Mapping[str, str | os.PathLike | None] | None = None) -> None:
    """What a command that writes into `folder` checks before its long work: the folder is no file, none of the
    files `names` it writes there is one of the `inputs` ({role: path}), and it can be written."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file: give a folder")
    check_not_inputs([folder / name for name in names], inputs or {})
    check_writable(folder)


def removed_note(removed: list[Path], folder: str | os.PathLike) -> str | None:
    """The note a command prints after `remove_stale` found leftovers in its output folder (None: none)."""
    if not removed:
        return None
    count = f"{len(removed)} temporary file{'s' * (len(removed) > 1)}"
    return f"removed {count} that an interrupted run left in {folder}"


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Raise the UserError a write into `folder` would end in, before any long work: a file in the way, no
    permission, a read-only file system, a full disk. Creates nothing that stays (the folder itself is not made)."""
    folder = Path(folder)
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"the {what} {folder} cannot be made: {existing} is a file: choose another path")
    try:
        stat = os.statvfs(existing)
    except OSError:
        stat = None
    if stat is not None and stat.f_bavail * stat.f_frsize < MIN_FREE_BYTES:
        raise write_error(folder, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    probe = temporary_path(existing / ".hetcache-probe")
    try:
        with open(probe, "wb") as handle:
            handle.write(bytes(PROBE_BYTES))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        raise write_error(folder, error) from error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
