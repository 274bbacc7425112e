"""A scan whose locations are URIs: local copies in, the object-store commit protocol out.

Object stores have no atomic rename and no locks.  So a scan with URIs works on local copies in a
private temporary folder, and publishes like this:

* Inputs, suite and model are copied in while they are hashed: both passes read the hashed bytes.
* The state folder and the provenance log are copied in and written back; the log only if nobody
  changed it meanwhile (one writer per log and per ``--out``: one scheduled job, ``max_active_runs=1``).
* The run folder is built locally, then published (:func:`publish_remote`):
  1. every file under ``OUT/<attempt>/``, where attempt is the file-safe run id and a nonce;
  2. ``OUT/<attempt>/MANIFEST.json``: every file with its size and sha256;
  3. ``OUT/_SUCCESS``, one object put whole, naming the attempt and the manifest's sha256;
  4. the COMPLETE record committed to the log; should that fail, the previous ``_SUCCESS`` goes back.
  A reader that follows ``_SUCCESS`` (:func:`published`) sees a complete run; the previous run stays
  readable until step 3.  Attempts that ``_SUCCESS`` no longer names are deleted after the commit.

``review`` and ``report`` read such a run through :func:`run_folder`: a local copy of the run that
``_SUCCESS`` names, each file checked against the manifest while it is copied.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from poisonguard import storage
from poisonguard.errors import InputError
from poisonguard.io import hidden, sha256_file
from poisonguard.names import CLEAN, DEFAULT_LOG, MANIFEST, SUCCESS, safe_name
from poisonguard.run import rundir

log = logging.getLogger("poisonguard")


@dataclass
class Locations:
    """Where a scan works (local paths) and what it calls them in its outputs (URIs or paths)."""

    inputs: list[str]
    run_dir: str
    config: object
    public_run_dir: str
    public_outputs: str  # where the output files are named (OUT/<attempt> on an object store)
    names: dict[str, str] = field(default_factory=dict)  # local input path -> the name it was given
    publish: object = rundir.publish

    def public(self, value):
        """Every local copy's path in ``value`` (a summary, facets) replaced by its name, in place."""
        if isinstance(value, str):
            return self.names.get(value, value)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in list(items):
            value[key] = self.public(item)
        return value


@contextlib.contextmanager
def locations(inputs: list[str], run_dir: str, config, run_id: str):
    """Local paths pass through; URIs are copied in (and back out) around the scan."""
    uris = [*inputs, run_dir, config.state, config.provenance_log, config.suite, config.embedding.model]
    if not any(storage.is_remote(u) for u in uris):
        local = str(Path(run_dir).resolve())
        yield Locations(inputs, run_dir, config, local, local)
        return
    with tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp:
        yield from _remote(inputs, run_dir, config.model_copy(deep=True), run_id, Path(tmp).resolve())


def _remote(inputs, run_dir, config, run_id, tmp: Path):
    local_inputs, names = _copy_inputs(inputs, tmp / "inputs")
    for keys in (("suite",), ("embedding", "model")):
        owner = config if len(keys) == 1 else getattr(config, keys[0])
        value = getattr(owner, keys[-1])
        if storage.is_remote(value):
            target = tmp / "files" / keys[-1] / storage.display(value).rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            storage.download(value, str(target))
            setattr(owner, keys[-1], str(target))
            names[str(target)] = storage.display(value)
    remote_out = storage.is_remote(run_dir)
    log_uri = config.provenance_log or (storage.join(run_dir.rsplit("/", 1)[0], DEFAULT_LOG) if remote_out else None)
    mirrored_log = _Mirror(log_uri, tmp / "log" / DEFAULT_LOG, True) if storage.is_remote(log_uri) else None
    state = _Mirror(config.state, tmp / "state", False) if storage.is_remote(config.state) else None
    for key, mirror in (("provenance_log", mirrored_log), ("state", state)):
        if mirror:
            setattr(config, key, str(mirror.local))
            names[str(mirror.local)] = storage.display(mirror.uri)
    if remote_out:
        attempt = f"{safe_name(run_id)}.{secrets.token_hex(4)}"
        local_run = str(tmp / "run" / "out")
        where = Locations(local_inputs, local_run, config, storage.display(run_dir),
                          storage.display(storage.join(run_dir, attempt)), names)
        where.publish = lambda staging, _run, rid, commit: publish_remote(
            staging, run_dir, attempt, rid, _then(commit, mirrored_log))
    else:
        local = str(Path(run_dir).resolve())
        where = Locations(local_inputs, run_dir, config, local, local, names)
        if mirrored_log:
            where.publish = lambda staging, run, rid, commit: rundir.publish(staging, run, rid,
                                                                               _then(commit, mirrored_log))
    completed = False
    try:
        yield where
        completed = True
    finally:
        if mirrored_log and not completed:
            mirrored_log.push_or_warn()  # a START and FAIL record of a run that stopped
        if state and completed:
            state.push_or_warn()


@contextlib.contextmanager
def mirrored(state: str | None, log_path: str | None, write_back: bool = True):
    """``review`` with its state folder or log on object storage: local copies, written back when it
    succeeds (unless not ``write_back``: a dry run), the log first (only over the bytes it read) so a
    decision never lands unbacked."""
    if not storage.is_remote(state) and not storage.is_remote(log_path):
        yield state, log_path
        return
    with tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp:
        log_copy = _Mirror(log_path, Path(tmp) / "log" / DEFAULT_LOG, True) if storage.is_remote(log_path) else None
        state_copy = _Mirror(state, Path(tmp) / "state", False) if storage.is_remote(state) else None
        yield (str(state_copy.local) if state_copy else state), (str(log_copy.local) if log_copy else log_path)
        for copy in (log_copy, state_copy) if write_back else ():
            if copy:
                copy.push()


def _then(commit, mirrored_log):
    def both():
        commit()
        if mirrored_log:
            mirrored_log.push()
    return both


def _copy_inputs(inputs: list[str], folder: Path) -> tuple[list[str], dict[str, str]]:
    local, names = [], {}
    for item in inputs:
        if not storage.is_remote(item):
            local.append(item)
            continue
        if storage.has_pattern(item):
            uris, root = storage.expand(item), storage.fixed_prefix(item)
        elif storage.kind(item) == "file":
            uris, root = [item], None
        else:
            uris = storage.list_files(item, "*.parquet") or storage.list_files(item, "**/*.parquet")
            root = item
        if root is not None:  # as a local folder or pattern is read (io.hidden)
            uris = [uri for uri in uris if not hidden(storage.relative(uri, root))]
        if not uris:
            raise InputError("no Parquet file found here (names starting with '.' or '_' are left out)",
                             path=storage.display(item))
        for uri in uris:
            below = storage.relative(uri, root) if root else storage.display(uri).split("://", 1)[1]
            target = folder / f"{len(names):06d}" / _local_below(below, uri)
            target.parent.mkdir(parents=True)
            storage.download(uri, str(target))
            names[os.path.realpath(target)] = storage.display(uri)
        local.append(str(folder))
    return list(dict.fromkeys(local)), names


def _local_below(below: str, uri: str) -> Path:
    """The local copy's path under its own folder: the object's ``key=value`` folders (the Hive
    partition keys ``partitioning: hive`` reads) and its file name (ending .parquet, as the local
    folder is searched for); nothing else of an attacker-chosen object key (``..``, empty segments)
    reaches the local path."""
    *folders, name = below.split("/")
    name = name if name not in ("", ".", "..") else "part"
    kept = [part for part in folders if "=" in part] + [name if name.endswith(".parquet") else name + ".parquet"]
    for part in kept:
        if "\0" in part or len(part.encode("utf-8", "surrogatepass")) > 255:
            raise InputError(f"object name part {part[:40]!r}... cannot be a local file name",
                             path=storage.display(uri))
    return Path(*kept)


class _Mirror:
    """A local copy of a remote file or folder, written back only over what was read."""

    def __init__(self, uri: str, local: Path, one_file: bool):
        self.uri, self.local = uri, local
        self.read = {}
        if one_file:
            local.parent.mkdir(parents=True, exist_ok=True)
            data = storage.read_bytes(uri)
            if data is not None:
                local.write_bytes(data)
            self.read[""] = _sha(data)
        else:
            local.mkdir(parents=True, exist_ok=True)
            for child in storage.list_files(uri):
                rel = storage.relative(child, uri)
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                self.read[rel] = storage.download(child, str(local / rel))

    def push(self) -> None:
        if "" in self.read:  # the log: only over the bytes it started from
            if _sha(storage.read_bytes(self.uri)) != self.read[""]:
                raise InputError("the provenance log changed during this scan (another writer?); nothing published",
                                 path=storage.display(self.uri))
            data = self.local.read_bytes() if self.local.exists() else b""
            storage.write_bytes(self.uri, data)
            self.read[""] = _sha(data)
            return
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = path.relative_to(self.local).as_posix()
            digest = _sha(path.read_bytes())
            if self.read.get(rel) != digest:
                storage.upload(str(path), storage.join(self.uri, rel))
                self.read[rel] = digest

    def push_or_warn(self) -> None:
        try:
            self.push()
        except (InputError, OSError) as exc:
            log.warning("could not write back %s: %s", storage.display(self.uri), exc)


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def publish_remote(staging: str, out: str, attempt: str, run_id: str, commit) -> None:
    """Steps 1-4 of the commit protocol (module docstring)."""
    rundir.seal(staging, run_id)
    prefix = storage.join(out, attempt)
    files = []
    for path in sorted(p for p in Path(staging).rglob("*") if p.is_file()):
        rel = path.relative_to(staging).as_posix()
        storage.upload(str(path), storage.join(prefix, rel))
        files.append({"path": rel, "bytes": path.stat().st_size, "sha256": sha256_file(str(path))})
    manifest = json.dumps({"run_id": run_id, "attempt": attempt, "files": files}, indent=1).encode()
    storage.write_bytes(storage.join(prefix, MANIFEST), manifest)
    previous = storage.read_bytes(storage.join(out, SUCCESS))
    pointer = {"run_id": run_id, "attempt": attempt, "manifest": f"{attempt}/{MANIFEST}",
               "manifest_sha256": hashlib.sha256(manifest).hexdigest()}
    storage.write_bytes(storage.join(out, SUCCESS), (json.dumps(pointer) + "\n").encode())
    try:
        commit()
    except BaseException:
        if previous is None:
            storage.delete(storage.join(out, SUCCESS))
        else:
            storage.write_bytes(storage.join(out, SUCCESS), previous)
        raise
    for old in _attempts(out) - {attempt}:
        try:
            storage.delete(storage.join(out, old))
        except InputError as exc:
            log.warning("could not delete the replaced attempt %s: %s", old, exc)


def _json_object(raw: bytes, fields: dict, what: str, out: str) -> dict:
    """``raw`` as a JSON object holding ``fields`` (name -> type); InputError naming ``what`` otherwise."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        data = None
    if not (isinstance(data, dict) and all(isinstance(data.get(k), kind) for k, kind in fields.items())):
        raise InputError(f"{what} is not a poisonguard run pointer", path=storage.display(out))
    return data


def _attempts(out: str) -> set[str]:
    found = (storage.relative(uri, out) for uri in storage.list_files(out))
    return {rel.split("/", 1)[0] for rel in found if "/" in rel}


def published(out: str) -> dict:
    """What a reader of an object-store run folder sees: the run ``_SUCCESS`` names, its files as
    URIs, each checked against the manifest.  InputError when no complete run is there."""
    raw = storage.read_bytes(storage.join(out, SUCCESS))
    if raw is None:
        raise InputError("no published run here (no _SUCCESS)", path=storage.display(out))
    pointer = _json_object(raw, dict.fromkeys(("run_id", "attempt", "manifest", "manifest_sha256"), str),
                           "_SUCCESS", out)
    manifest = storage.read_bytes(storage.join(out, pointer["manifest"]))
    if manifest is None or hashlib.sha256(manifest).hexdigest() != pointer["manifest_sha256"]:
        raise InputError("the manifest _SUCCESS names is missing or altered", path=storage.display(out))
    files = _json_object(manifest, {"files": list}, "the manifest", out)["files"]
    if not all(isinstance(f, dict) and isinstance(f.get("path"), str) for f in files):
        raise InputError("the manifest's file list is malformed", path=storage.display(out))
    return {"run_id": pointer["run_id"], "attempt": pointer["attempt"],
            "files": {f["path"]: storage.join(out, pointer["attempt"], f["path"]) for f in files},
            "manifest": files}


@contextlib.contextmanager
def run_folder(run_dir: str, clean: bool = True):
    """``(local run folder, clean_ids)`` for ``review`` and ``report``: a local ``run_dir`` as it is; on
    object storage, a private local copy of the run ``_SUCCESS`` names (:func:`published`), every
    file's sha256 checked against the manifest as it is copied.  ``clean=False`` leaves the clean
    output where it is (``review`` reads only its ids, and only to say why a decision names a row
    that is not in the quarantine): ``clean_ids(column)`` reads that column of the clean parts,
    wherever they are."""
    if not storage.is_remote(run_dir):
        yield run_dir, lambda column: column_of(run_dir, clean_parts(run_dir), column)
        return
    run = published(run_dir)
    attempt = storage.join(run_dir, run["attempt"])
    parts = sorted(rel for rel in run["files"] if _below(rel, CLEAN) and rel.endswith(".parquet"))
    with tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp:
        local = Path(tmp, "run")
        for entry in run["manifest"]:
            rel = entry["path"]
            if not clean and _below(rel, CLEAN):
                continue
            target = local.joinpath(*_parts_of(rel, run_dir))
            target.parent.mkdir(parents=True, exist_ok=True)
            uri = run["files"][rel]
            if storage.download(uri, str(target)) != entry.get("sha256"):
                raise InputError("changed since it was published (its sha256 differs from the run's manifest)",
                                 path=storage.display(uri))
        with _named_as(str(local), attempt):
            yield str(local), lambda column: column_of(attempt, parts, column)


@contextlib.contextmanager
def local_inputs(inputs: list[str]):
    """``(local paths, names)`` for a command that reads Parquet inputs outside a scan (``suite
    infer``): URIs copied into a private temporary folder, as a scan copies them; ``names`` maps each
    copy to the URI it came from, and errors name the URIs."""
    if not any(storage.is_remote(item) for item in inputs):
        yield inputs, {}
        return
    with tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp:
        local, names = _copy_inputs(inputs, Path(tmp).resolve() / "inputs")
        with contextlib.ExitStack() as stack:
            for copy, uri in names.items():
                stack.enter_context(_named_as(copy, uri))
            yield local, names


@contextlib.contextmanager
def local_file(path: str | None, missing_ok: bool = False):
    """A local path as it is; a URI as a private local copy (``review --decisions``, the log ``report``
    and ``verify-log`` read).  ``missing_ok``: None where there is no such file, local or remote."""
    if not storage.is_remote(path):
        yield None if missing_ok and not (path and os.path.isfile(path)) else path
        return
    with tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp:
        local = os.path.join(tmp, "copy" + os.path.splitext(storage.display(path))[1][:16])
        if storage.download(path, local, missing_ok=True) is None:
            if not missing_ok:
                raise InputError("no such file", path=storage.display(path))
            yield None
            return
        with _named_as(local, path):
            yield local


@contextlib.contextmanager
def _named_as(local: str, uri: str):
    """Errors named as the remote files are, not as the local copy that is gone when they are read."""
    try:
        yield
    except InputError as exc:
        raise InputError(str(exc).replace(local, storage.display(uri))) from None


def _below(rel: str, folder: str) -> bool:
    return rel.startswith(folder + "/")


def _parts_of(rel: str, run_dir: str) -> list[str]:
    """A manifest path's parts, as a local path below the copy: nothing that climbs out of it."""
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise InputError(f"the manifest names a file outside the run: {rel[:80]!r}", path=storage.display(run_dir))
    return parts


def clean_parts(run_dir: str) -> list[str]:
    """A local run folder's clean parts, as paths below it."""
    return sorted(f"{CLEAN}/{p.name}" for p in Path(run_dir, CLEAN).glob("*.parquet"))


def column_of(root: str, parts: list[str], column: str) -> set[str]:
    """One column of the Parquet ``parts`` (paths below ``root``, a folder or a URI), as strings."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    if not parts:
        return set()
    fs, base = storage.filesystem(root) if storage.is_remote(root) else (None, root)
    try:
        table = pads.dataset([f"{base.rstrip('/')}/{p}" for p in parts], filesystem=fs,
                             format="parquet").to_table(columns=[column])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"the run's clean output is unreadable: {str(exc).splitlines()[0][:200]}",
                         path=storage.display(root)) from None
    return set(table.column(column).cast(pa.string()).to_pylist())
