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
from poisonguard.names import DEFAULT_LOG, OUTPUT_FOLDERS, SUCCESS, WORK

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


def run_dir_lock(run_dir: str):
    """One scan per RUN_DIR at a time; a second one waits for the first to finish."""
    path = Path(run_dir)
    return locked_file(path.parent / f".{path.name}.lock", append=False)


def remove_stale_staging(run_dir: str) -> None:
    """Staging folders of this RUN_DIR found while holding its lock belong to killed scans."""
    path = Path(run_dir)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.staging-*"):
        log.warning("removing staging folder of an interrupted scan: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(run_dir: str, run_id: str):
    """A fresh staging folder (clean/, quarantine/, _work/), removed unless it was published."""
    path = Path(run_dir)
    staging = path.parent / f".{path.name}.staging-{run_id}"
    try:
        for folder in (*OUTPUT_FOLDERS, WORK):
            (staging / folder).mkdir(parents=True)
    except OSError as exc:
        raise InputError(f"cannot create the staging folder: {exc.strerror}", path=str(staging)) from None
    try:
        yield str(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: str, run_dir: str, run_id: str) -> None:
    shutil.rmtree(os.path.join(staging, WORK), ignore_errors=True)
    Path(staging, SUCCESS).write_text(run_id + "\n")
    old = None
    if os.path.exists(run_dir):
        old = os.path.join(os.path.dirname(run_dir), f".{os.path.basename(run_dir)}.old-{run_id}")
        os.rename(run_dir, old)
    os.rename(staging, run_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
