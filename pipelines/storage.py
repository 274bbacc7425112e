"""The one filesystem layer for URIs (``s3://``, ``gs://``, ``hdfs://`` and what fsspec adds).

pyarrow.fs serves the schemes it builds in; any other scheme goes through fsspec, whose
implementation package (s3fs, gcsfs, adlfs, ...) is an extra.  A scheme whose package is missing is
an input error naming the extra to install.  Credentials come from the environment (the AWS / GCP
credential chains); a URI written with ``user:secret@`` is shown without them (:func:`display`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

from poisonguard.errors import InputError

_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
ARROW_SCHEMES = {"s3": "_s3fs", "gs": "_gcsfs", "gcs": "_gcsfs", "hdfs": "_hdfs"}
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
CHUNK = 8 << 20
GCS_RETRY_LIMIT_S = 60  # Arrow's GCS client retries an unreachable store for 15 minutes by default


def is_remote(path: str | None) -> bool:
    match = _URI.match(path or "")
    return bool(match) and match.group(1).lower() != "file"


def display(uri: str) -> str:
    """A URI as it may be logged or recorded: no user, password or query string (which can carry keys)."""
    if not is_remote(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    return urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


def join(uri: str, *names: str) -> str:
    """``uri`` with names appended to its path; a query string (options such as
    ``endpoint_override``) stays at the end."""
    base, sep, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)]) + sep + query


def has_pattern(uri: str) -> bool:
    """``*`` or ``[`` in a URI's path; ``?`` starts its query string, as in any URI."""
    return any(ch in uri.partition("?")[0] for ch in "*[")


def _base(uri: str) -> str:
    return uri.partition("?")[0].rstrip("/")


def filesystem(uri: str):
    """``(pyarrow.fs.FileSystem, path)`` for a URI; InputError (exit 2) when it cannot be served."""
    import pyarrow.fs as pafs

    scheme = _URI.match(uri).group(1).lower()
    module = ARROW_SCHEMES.get(scheme)
    if module and _arrow_has(module):
        if module == "_gcsfs" and "retry_limit_seconds=" not in uri.partition("?")[2]:
            uri = f"{uri}{'&' if '?' in uri else '?'}retry_limit_seconds={GCS_RETRY_LIMIT_S}"
        if scheme in BUCKET_SCHEMES:
            return _bucket_filesystem(uri)
        try:
            return pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot open this location: {_first_line(exc)}", path=display(uri)) from None
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError:
        extra = EXTRAS.get(scheme, scheme)
        raise InputError(f"no filesystem package for {scheme}:// is installed; "
                         f"pip install 'poisonguard[{extra}]'", path=display(uri)) from None
    except (ValueError, OSError) as exc:
        raise InputError(f"cannot open this location: {_first_line(exc)}", path=display(uri)) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


BUCKET_SCHEMES = {"s3", "gs", "gcs"}  # Arrow's path for these is "bucket/key"
_CREDENTIAL_ENV = ("AWS_", "GOOGLE_", "GCS_", "STORAGE_EMULATOR_HOST")
_BUCKETS: dict[tuple, object] = {}  # (scheme, user, bucket, options, environment) -> FileSystem
_BUCKETS_MAX = 64


def _bucket_filesystem(uri: str):
    """Arrow's filesystem for a bucket, built once per process and bucket: building one looks the
    bucket's region up (a round trip to the store), which a run's per-object reads and writes would
    otherwise pay for every object.  The key holds everything ``from_uri`` reads besides the object's
    path: the scheme, the credentials and bucket of the netloc, the options of the query string, and
    the credential environment variables (a process that changes them gets a new filesystem)."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    environment = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_CREDENTIAL_ENV)))
    key = (parts.scheme.lower(), parts.netloc, parts.query, environment)
    fs = _BUCKETS.get(key)
    if fs is None:
        root = urlunsplit((parts.scheme, parts.netloc, "/", parts.query, ""))
        try:
            fs, _ = pafs.FileSystem.from_uri(root)
        except (ValueError, OSError) as exc:
            raise InputError(f"cannot open this location: {_first_line(exc)}", path=display(uri)) from None
        if len(_BUCKETS) >= _BUCKETS_MAX:
            _BUCKETS.clear()
        _BUCKETS[key] = fs
    return fs, unquote(parts.netloc.rpartition("@")[2] + parts.path).rstrip("/")


def _arrow_has(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(f"pyarrow.{module}")
        return True
    except ImportError:
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _call(uri: str, what: str, fn, *args):
    try:
        return fn(*args)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot {what}: {_first_line(exc)}", path=display(uri)) from None


def kind(uri: str) -> str:
    """``file``, ``folder`` or ``missing``."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = _call(uri, "look it up", fs.get_file_info, path)
    if info.type == pafs.FileType.File:
        return "file"
    if info.type == pafs.FileType.Directory:
        return "folder"
    # object stores have no folders: a prefix with objects under it is one
    return "folder" if list_files(uri) else "missing"


def list_files(uri: str, pattern: str = "*") -> list[str]:
    """Every file below a URI prefix whose path relative to it matches ``pattern``, sorted, as URIs."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True)
    infos = _call(uri, "list it", fs.get_file_info, selector)
    root = path.rstrip("/") + "/"
    found = [info.path[len(root):] for info in infos if info.type == pafs.FileType.File and info.path.startswith(root)]
    return sorted(join(uri, rel) for rel in found if fnmatch.fnmatch(rel, pattern))


def relative(uri: str, root: str) -> str:
    """The path of ``uri`` below ``root`` (both as :func:`list_files` builds them)."""
    return _base(uri)[len(_base(root)) + 1:]


def expand(pattern: str) -> list[str]:
    """A URI with ``*`` / ``[`` in its path: every file below its fixed prefix that matches."""
    base = pattern.partition("?")[0]
    return [uri for uri in list_files(fixed_prefix(pattern)) if fnmatch.fnmatch(_base(uri), base)]


def fixed_prefix(pattern: str) -> str:
    """A pattern URI's folders before its first ``*`` / ``[`` (with the query string)."""
    base, sep, query = pattern.partition("?")
    cut = min(base.find(ch) for ch in "*[" if ch in base)
    return base[:base.rfind("/", 0, cut)] + sep + query


def download(uri: str, local: str, missing_ok: bool = False) -> str | None:
    """Copy one object to a local file while hashing it; return its sha256.  ``missing_ok``: None,
    and no local file, where there is no such object (one request, not a lookup and then a read)."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()

    def copy():
        with fs.open_input_stream(path) as source, open(local, "wb") as target:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                target.write(chunk)

    try:
        copy()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise InputError("cannot read it: no such file", path=display(uri)) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read it: {_first_line(exc)}", path=display(uri)) from None
    return digest.hexdigest()


def read_small(uri: str, limit: int) -> bytes | None:
    """A whole object of at most ``limit`` bytes (its size looked up first: a config is not read when
    it is larger); None if there is none; InputError where it is larger."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = _call(uri, "look it up", fs.get_file_info, path)
    if info.type != pafs.FileType.File:
        return None
    if info.size is not None and info.size > limit:
        raise InputError(f"larger than {limit} bytes", path=display(uri))

    def read():
        with fs.open_input_stream(path) as source:
            return source.read(limit + 1)  # one byte past the limit tells an object that grew since

    data = _call(uri, "read it", read)
    if len(data) > limit:
        raise InputError(f"larger than {limit} bytes", path=display(uri))
    return data


def beside(uri: str, relative: str) -> str:
    """``relative`` (a path with ``/``) against the folder of the object ``uri``, ``.`` and ``..``
    resolved within its bucket; ``uri``'s query string (options such as ``endpoint_override``) kept."""
    import posixpath

    parts = urlsplit(uri)
    path = posixpath.normpath(posixpath.join(posixpath.dirname(parts.path) or "/", relative))
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def read_bytes(uri: str) -> bytes | None:
    """A whole object, or None if there is none."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    if _call(uri, "look it up", fs.get_file_info, path).type != pafs.FileType.File:
        return None

    def read():
        with fs.open_input_stream(path) as source:
            return source.read()

    return _call(uri, "read it", read)


def write_bytes(uri: str, data: bytes) -> None:
    """One object, put whole: readers see the old bytes or the new ones."""
    fs, path = filesystem(uri)

    def write():
        with fs.open_output_stream(path) as target:
            target.write(data)

    _call(uri, "write it", write)


def upload(local: str, uri: str) -> None:
    fs, path = filesystem(uri)

    def copy():
        with open(local, "rb") as source, fs.open_output_stream(path) as target:
            while chunk := source.read(CHUNK):
                target.write(chunk)

    _call(uri, "write it", copy)


def delete(uri: str) -> None:
    """Remove one object or everything below a prefix; what is not there is fine."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    info = _call(uri, "look it up", fs.get_file_info, path)
    if info.type == pafs.FileType.File:
        _call(uri, "delete it", fs.delete_file, path)
    elif info.type == pafs.FileType.Directory:  # and any folder-marker objects a store keeps
        _call(uri, "delete it", fs.delete_dir, path)
