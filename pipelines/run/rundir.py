"""A run folder's lifecycle: check, lock, staging, publish.

Outputs are written to ``.RUN.staging-<id>`` beside ``RUN_DIR`` and moved into place only when
complete; one scan per ``RUN_DIR`` at a time (an flock on a lock file beside it).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
from pathlib import Path

from poisonguard.errors import InputError
from poisonguard.locking import locked_file
from poisonguard.names import DEFAULT_LOG, OUTPUT_FOLDERS, SUCCESS, WORK, safe_name

log = logging.getLogger("poisonguard")


def default_log_path(run_dir: str) -> str:
    return str(Path(run_dir).resolve().parent / DEFAULT_LOG)


def check_run_dir(run_dir: str) -> None:
    path = Path(run_dir)
    if path.exists():
        if not path.is_dir():
            raise InputError("--out exists and is not a folder", path=run_dir)
        if any(path.iterdir()) and not (path / SUCCESS).exists():
            raise InputError("--out exists, is not empty and is not a poisonguard run folder; refusing to replace it",
                             path=run_dir)
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise InputError("cannot create the output folder: its parent is not a folder", path=str(parent))
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise InputError(f"cannot create the output's parent folder: {exc.strerror}", path=str(parent)) from None
    if not os.access(parent, os.W_OK):
        raise InputError("output folder's parent is not writable", path=str(parent))


def check_outside(run_dir: str, **paths: str | None) -> None:
    """The long-lived log and state folder must not live inside RUN_DIR, which a publish replaces."""
    inside = os.path.realpath(run_dir) + os.sep
    for key, value in paths.items():
        if value and (os.path.realpath(value) + os.sep).startswith(inside):
            raise InputError(f"{key.replace('_', ' ')} is inside --out, which the next publish replaces; "
                             "keep it beside the run folder", path=value)


def check_log_path(path: str) -> None:
    """The provenance log must be a file poisonguard can append to (created where it is missing)."""
    if os.path.isdir(path):
        raise InputError("the provenance log is a folder; give a file path (--provenance-log)", path=path)
    if os.path.exists(path) and not os.access(path, os.R_OK | os.W_OK):
        raise InputError("the provenance log is not readable and writable by this user", path=path)


def run_dir_lock(run_dir: str):
    """One scan per RUN_DIR at a time; a second one waits for the first to finish."""
    path = Path(run_dir)
    return locked_file(path.parent / f".{path.name}.lock", append=False, remove=True)


def recover(run_dir: str) -> None:
    """A scan killed between the two renames of a two-step publish left RUN_DIR missing and the
    last good run at ``.RUN.old-<id>``: put it back before anything else runs."""
    path = Path(run_dir)
    if path.exists() or path.is_symlink():
        return
    olds = sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*"), key=lambda p: p.lstat().st_mtime)
    olds = [p for p in olds if p.is_dir() and not p.is_symlink() and (p / SUCCESS).exists()]
    if olds:
        log.warning("restoring the last published run from %s (a publish was interrupted)", olds[-1])
        os.rename(olds[-1], run_dir)


def remove_stale_staging(run_dir: str) -> None:
    """Staging and replaced-run folders of this RUN_DIR found while holding its lock belong to
    interrupted scans; a symlink planted there is removed, never followed."""
    path = Path(run_dir)
    for pattern in (f".{glob.escape(path.name)}.staging-*", f".{glob.escape(path.name)}.old-*"):
        for stale in path.parent.glob(pattern):
            log.warning("removing the leftover of an interrupted scan: %s", stale)
            if stale.is_symlink() or not stale.is_dir():
                stale.unlink(missing_ok=True)
            else:
                shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(run_dir: str, run_id: str):
    """A fresh staging folder (clean/, quarantine/, _work/), created exclusively, and removed on
    the way out (after a publish it holds the replaced run)."""
    path = Path(run_dir)
    staging = path.parent / f".{path.name}.staging-{safe_name(run_id)}"
    try:
        os.mkdir(staging, 0o750)  # fails on anything already there, a symlink included
        for folder in (*OUTPUT_FOLDERS, WORK):
            os.mkdir(staging / folder, 0o750)
    except FileExistsError:
        raise InputError("a staging folder for this run id already exists", path=str(staging)) from None
    except OSError as exc:
        raise InputError(f"cannot create the staging folder: {exc.strerror}", path=str(staging)) from None
    try:
        yield str(staging)
    finally:
        if staging.is_symlink():
            staging.unlink()
        else:
            shutil.rmtree(staging, ignore_errors=True)


def seal(staging: str, run_id: str) -> None:
    """What every publish does first: drop the scratch folder and mark the run complete."""
    shutil.rmtree(os.path.join(staging, WORK), ignore_errors=True)
    Path(staging, SUCCESS).write_text(run_id + "\n")


def publish(staging: str, run_dir: str, run_id: str, commit) -> None:
    """Swap the staging folder into RUN_DIR, then ``commit()`` (the COMPLETE record): if that
    fails, the previous run is swapped back.  Readers see the old run or the new one, never neither."""
    seal(staging, run_id)
    if not os.path.exists(run_dir):
        os.rename(staging, run_dir)
        _commit_or(commit, lambda: os.rename(run_dir, staging))
    elif exchange(staging, run_dir):  # the old run is now at the staging path, removed by staging_folder
        _commit_or(commit, lambda: exchange(staging, run_dir))
    else:  # no RENAME_EXCHANGE here: two renames, undone by recover() if killed between them
        old = os.path.join(os.path.dirname(run_dir), f".{os.path.basename(run_dir)}.old-{safe_name(run_id)}")
        os.rename(run_dir, old)
        os.rename(staging, run_dir)

        def undo():
            os.rename(run_dir, staging)
            os.rename(old, run_dir)

        _commit_or(commit, undo)
        shutil.rmtree(old, ignore_errors=True)


def _commit_or(commit, undo) -> None:
    try:
        commit()
    except BaseException:
        undo()
        raise


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)
