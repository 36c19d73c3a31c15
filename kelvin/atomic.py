"""Files written as transactions: the one home of Kelvin's atomic writes and of the errors they raise.

Every file of a run (and of an export, and of an evaluation report) is written by :func:`write_atomic`: a
temporary file in the same directory, flushed and fsynced, checked, then ``os.replace``d over the target, so a
crash, a SIGKILL or a full disk leaves the old file or the new one, never a torn one. :func:`_stage` and
:func:`_commit` are its two halves, for a transaction of several files (:meth:`kelvin.rundir.Snapshot.write`);
:func:`unusable_output_dir` says, before anything is created, why a folder cannot take the output.

:class:`RunDirError` (a run directory or a file in it that cannot be used) lives here, below
:mod:`kelvin.rundir`, because :class:`SaveError` (a write that failed) is one: the run directories import
the writers and their errors, never the other way round.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["RunDirError", "SaveError", "unusable_output_dir", "write_atomic", "write_failure", "write_text_atomic"]

_TEMP_PREFIX = ".kelvin-tmp-"  # temporary files of write_atomic: hidden, never matched by step_*.zip


def unusable_output_dir(path: Path) -> tuple[str, Path, str] | None:
    """Why ``path`` cannot become an output directory, found before anything is created (the one check behind
    run directories, evaluation reports and exports): ``("file", folder, "")`` when ``path`` or a folder above it
    is a file (``folder`` is that file), ``("unwritable", folder, reason)`` when its nearest existing folder
    refuses a new file (a real probe: ``os.access`` says yes to root on a read-only sysfs); None when it can."""
    folder = Path(path)
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return "file", folder, ""
    try:
        fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return "unwritable", folder, str(exc.strerror or exc)
    return None


class RunDirError(ValueError):
    """A run directory or a file in it that cannot be used; the message names the file and the fix."""


class SaveError(RunDirError):
    """A file that could not be written (full disk, read-only directory, a save that does not load back);
    the message names the file, the reason, and that the previous version of the file is kept."""


# ---------------------------------------------------------------------- atomic writes
def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes, check: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never a torn one.

    The bytes go to a temporary file in the same directory (same file system, so the rename is atomic),
    which is flushed and fsynced; ``check(temp_path)`` may then refuse it by raising (e.g. a model that
    does not load back); only then is it ``os.replace``d over ``path``. On any failure the temporary
    file is removed, ``path`` is left as it was, and a :class:`SaveError` names the file and the cause.
    """
    path = Path(path)
    tmp = _stage(path, data, check)
    _commit([(tmp, path)])
    return path


def _stage(path: Path, data: bytes, check: Callable[[Path], None] | None = None) -> Path:
    """The first half of :func:`write_atomic`: ``data`` in a complete, fsynced and checked temporary file beside
    ``path`` (returned); ``path`` is not touched. On failure the temporary file is removed and a
    :class:`SaveError` names ``path`` and the cause."""
    tmp = path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}")
    try:  # mode 0o666 minus the umask, as a plain open() would create the file (mkstemp's 0o600 is not)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise SaveError(_save_message(path, exc)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise SaveError(_save_message(path, exc)) from None
        if isinstance(exc, RunDirError) and not isinstance(exc, SaveError):
            raise SaveError(f"{path} was not written: the new file does not load back ({exc}); "
                            f"{_kept(path)}") from None
        raise
    return tmp


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """The second half: rename each staged ``(temporary, target)`` over its target, as one step. Should a rename
    fail (the file system turned read-only...), the targets already replaced get their previous files back (kept
    as hard links until every rename is done), the temporary files are removed, and a :class:`SaveError` names the
    file. Only a crash between two renames (microseconds) can leave a new file beside an old one: the
    normaliser's ``kelvin_step`` then tells them apart (:func:`load_vecnormalize`)."""
    # (target, hard link to its previous file; None: it had none; False: the file system has no hard links)
    backups: list[tuple[Path, Path | None | bool]] = []
    target = staged[0][1]
    try:
        for tmp, target in staged:
            backup = None
            if len(staged) > 1 and target.exists():
                backup = target.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(6)}-previous-{target.name}")
                try:
                    os.link(target, backup)
                except OSError:
                    backup = False  # no way back for this one: kelvin_step still tells a mixed pair apart
            backups.append((target, backup))
            os.replace(tmp, target)
    except OSError as exc:
        failed = target
        for done, backup in backups:  # put back what was replaced before the failure
            if done == failed:
                break
            with contextlib.suppress(OSError):
                if backup:
                    os.replace(backup, done)
                elif backup is None:
                    done.unlink()
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for _, backup in backups:
            if backup:
                backup.unlink(missing_ok=True)
        raise SaveError(_save_message(failed, exc)) from None
    for _, backup in backups:
        if backup:
            backup.unlink(missing_ok=True)
    for directory in dict.fromkeys(target.parent for _, target in staged):
        _fsync_dir(directory)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """:func:`write_atomic` for text (UTF-8)."""
    return write_atomic(path, text.encode("utf-8"))


def _kept(path: Path) -> str:
    return f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"


def write_failure(path: str | Path, exc: OSError) -> tuple[str, str]:
    """``(reason, fix)`` in words for an ``OSError`` writing ``path``: ``("the disk is full", "free some space")``."""
    path = Path(os.fsdecode(path))
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.EROFS: "the file system is read-only",
              errno.ENOENT: f"its directory {path.parent} does not exist"}.get(exc.errno,
                                                                                 exc.strerror or type(exc).__name__)
    fix = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "make the directory writable"
    return f"{reason} ({type(exc).__name__} errno {exc.errno})", fix


def _save_message(path: Path, exc: OSError) -> str:
    reason, fix = write_failure(path, exc)
    return f"cannot write {path}: {reason}; {_kept(path)}: {fix} and try again"


def _create_exclusive(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, or a ``FileExistsError`` when it exists. A complete temporary file is
    hard-linked into place (atomic: a reader never sees it half-written); where the file system has no hard links,
    the file is created exclusively and written (a reader may then briefly see it empty: unreadable, never stale)."""
    tmp = _stage(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        tmp.unlink(missing_ok=True)
