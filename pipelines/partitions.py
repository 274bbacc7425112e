"""Hive partition keys: folder names ``key=value`` read as columns (config ``partitioning: hive``).

Only the folders below the input that found a file count (below a folder given, below a pattern's
fixed prefix; for a file named directly, the folders as written), so a ``key=value`` folder above
the dataset never becomes a column.  Values are percent-decoded as Hive writes them;
``__HIVE_DEFAULT_PARTITION__`` is null.  A key is int64 where every value is an integer written
canonically (``7``, not ``007``: a zip code stays text), otherwise a string.  Every file must name
the same keys in the same order, and no key may also be a column in the files: anything else is a
bad input (exit 2), never a guess.  The columns are appended after the files' own, in folder order.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pyarrow as pa

from poisonguard.errors import InputError

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_INTEGER = re.compile(r"-?(0|[1-9][0-9]{0,18})")
_INT64 = (-(2**63), 2**63 - 1)


def folder_keys(below: str, path: str) -> list[tuple[str, str | None]]:
    """(key, value) of every ``key=value`` folder in ``below``, in order."""
    pairs: list[tuple[str, str | None]] = []
    for segment in below.replace("\\", "/").split("/"):
        if "=" not in segment:
            continue
        raw_key, _, raw_value = segment.partition("=")
        key, value = _decoded(raw_key, path), _decoded(raw_value, path)
        if not key:
            raise InputError(f"folder name {segment!r} has no key before '='", path=path)
        if key in (k for k, _ in pairs):
            raise InputError(f"partition key {key!r} appears twice in the folder names", path=path)
        pairs.append((key, None if value == HIVE_NULL else value))
    return pairs


def _decoded(text: str, path: str) -> str:
    try:
        value = unquote(text, errors="strict")
        value.encode("utf-8")
    except UnicodeError:
        raise InputError(f"folder name {text!r} is not valid UTF-8 once percent-decoded", path=path) from None
    return value


def partition_columns(paths: list[str], below: dict[str, str], schema: pa.Schema) -> dict[str, tuple]:
    """Each file's ((field, value), ...) for its folder keys; one key list and one type per key."""
    keys = {path: folder_keys(below.get(path, ""), path) for path in paths}
    names = [k for k, _ in keys[paths[0]]]
    for path in paths:
        other = [k for k, _ in keys[path]]
        if other != names:
            raise InputError(f"partition keys {other or 'none'} differ from {paths[0]}'s {names or 'none'}", path=path)
    for name in names:
        if name in schema.names:
            raise InputError("this name is a column in the files and a partition key in the folder names",
                             path=paths[0], column=name)
    fields = [pa.field(name, _type_of([dict(keys[p])[name] for p in paths])) for name in names]
    return {path: tuple((field, _typed(value, field.type)) for field, (_, value) in zip(fields, keys[path]))
            for path in paths}


def _type_of(values: list[str | None]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(_INTEGER.fullmatch(v) and _INT64[0] <= int(v) <= _INT64[1] for v in present):
        return pa.int64()
    return pa.string()


def _typed(value: str | None, type_: pa.DataType):
    return int(value) if value is not None and pa.types.is_integer(type_) else value


def with_partition_columns(table: pa.Table, partition: tuple, columns: list[str] | None) -> pa.Table:
    """``table`` with the requested partition keys appended as constant columns."""
    for field, value in partition:
        if columns is None or field.name in columns:
            table = table.append_column(field, pa.repeat(pa.scalar(value, field.type), table.num_rows))
    return table
