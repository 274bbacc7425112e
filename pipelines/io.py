"""Finding, checking and reading the Parquet inputs; hashing files."""

from __future__ import annotations

import collections
import glob
import hashlib
import logging
import os
import threading
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard.config import Config
from poisonguard.errors import InputError, one_line
from poisonguard.names import is_added_column
from poisonguard.partitions import partition_columns, with_partition_columns

log = logging.getLogger("poisonguard")


ROWS_PER_WORK_ITEM = 262144  # rows of whole row groups per work item: the unit a worker reads


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int, int]:
    """What changes when a file's bytes change: device, inode, size, mtime and ctime (no user can set ctime)."""
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@dataclass(frozen=True)
class InputFile:
    index: int
    path: str
    rows: int
    row_groups: int
    sha256: str = ""
    identity: tuple = ()
    partition: tuple = ()  # ((pyarrow field, value), ...): the Hive keys in its folder names (poisonguard.partitions)


@dataclass(frozen=True)
class WorkItem:
    """A slice of one file (a run of row groups): the unit a reader processes."""

    file_index: int
    path: str
    first_group: int
    last_group: int  # exclusive
    first_row: int
    identity: tuple = ()  # the file as planned and hashed; a reader refuses a file that changed since
    partition: tuple = ()  # the file's partition columns, appended to every batch read
    cast: tuple = ()  # (pyarrow field, ...): columns read as one type in every file (``unify_schemas``)


@dataclass(frozen=True)
class InputPlan:
    files: tuple[InputFile, ...]
    schema: pa.Schema
    dim: int | None
    n_features: int | None = None
    model_path: str | None = None
    label_view: str = "embedding"  # "features": confident learning reads the feature column (core.embedding)
    confirmed_groups: tuple = ()  # (detector, str(label), moved share) that proxy mode's core.exclusion confirmed
    cast_columns: tuple = ()  # (pyarrow field, ...): typed differently across files, read as this field

    @property
    def total_rows(self) -> int:
        return sum(f.rows for f in self.files)


def discover(inputs: list[str], report: bool = True) -> list[str]:
    """Expand files, folders (every *.parquet below) and globs into a sorted, de-duplicated list;
    ``report``: log the files left out (``hidden``)."""
    return _sorted_paths(folders_below(inputs, report))


def _sorted_paths(found: dict[str, str]) -> list[str]:
    if not found:
        raise InputError("no input files given")
    return sorted(found)


def folders_below(inputs: list[str], report: bool = True) -> dict[str, str]:
    """Each discovered file (one entry however it is reached) and its folders below the input that
    found it (a folder, a pattern's fixed prefix; for a file named directly, the folders as written):
    where Hive partition keys are read."""
    found: dict[str, str] = {}
    for path, below in _walk(inputs, report):
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError("the file's path is not valid UTF-8 (a folder or file name holds other bytes)",
                             path=path) from None
        found.setdefault(path, below)
    return found


HIDDEN_PREFIXES = (".", "_")


def hidden(relative: str) -> bool:
    """A file a folder or pattern finds is left out where a part of its path below the folder (the
    pattern's fixed prefix) starts with ``.`` or ``_``: Spark's ``_temporary`` attempts and
    ``_SUCCESS``, Dask's ``_metadata``, editors' and notebooks' hidden copies.  Spark, Hive and
    ``pyarrow.dataset`` (``ignore_prefixes``) read folders the same way; a file named directly is read."""
    return any(part.startswith(HIDDEN_PREFIXES) for part in relative.replace("\\", "/").split("/")
               if part not in ("", ".", ".."))


def _visible(matches: list[str], base: str, item: str, report: bool) -> list[str]:
    kept = [p for p in matches if not hidden(os.path.relpath(p, base or "."))]
    if report and len(kept) < len(matches):
        log.info("%s: left out %d of %d files under a name starting with '.' or '_' (as Spark and pyarrow do)",
                 item, len(matches) - len(kept), len(matches))
    return kept


def _walk(inputs: list[str], report: bool):
    """(real path, folders below the input item) of every file each input names."""
    for item in inputs:
        if any(ch in item for ch in "*?["):
            base = _fixed_prefix(item)
            matches = _visible(sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p)), base, item,
                               report)
            if not matches:
                raise InputError("no file matches this pattern (names starting with '.' or '_' are left out)",
                                 path=item)
            yield from ((os.path.realpath(p), _below(p, base)) for p in matches)
        elif os.path.isdir(item):
            matches = _visible(sorted(str(p) for p in Path(item).rglob("*.parquet") if p.is_file()), item, item, report)
            if not matches:
                raise InputError("folder holds no *.parquet file (names starting with '.' or '_' are left out)",
                                 path=item)
            yield from ((os.path.realpath(p), _below(p, item)) for p in matches)
        elif os.path.isfile(item):
            yield os.path.realpath(item), os.path.dirname(item)
        else:
            raise InputError("no such file or folder", path=item)


def _fixed_prefix(pattern: str) -> str:
    parts = pattern.replace("\\", "/").split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:fixed])


def _below(path: str, base: str) -> str:
    return os.path.dirname(os.path.relpath(path, base or "."))


def plan_discovered(inputs: list[str], config: Config) -> InputPlan:
    """``plan_inputs`` over every file the inputs name, with their partition folders where read."""
    found = folders_below(inputs)  # one walk of the inputs for both
    return plan_inputs(_sorted_paths(found), config, found if config.partitioning == "hive" else None)


def plan_inputs(paths: list[str], config: Config, below: dict[str, str] | None = None) -> InputPlan:
    """Open every footer, check the schema against the config; raise InputError on any problem.
    ``below``: each path's folders below its input (``folders_below``), where ``partitioning: hive``
    reads partition keys."""
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    varied: set[str] = set()  # columns some file types otherwise than the first: read as the unified type
    for index, path in enumerate(paths):
        identity = file_identity(os.stat(path))
        meta = _read_metadata(path)
        file_schema = meta.schema.to_arrow_schema()
        if schema is None:
            first = schema = file_schema
        elif not file_schema.equals(schema):
            unified = unify_schemas(schema, file_schema)
            if unified is None:
                raise InputError(f"schema differs from {paths[0]}: {_schema_diff(schema, file_schema)}", path=path,
                                 column=_first_clash(schema, file_schema))
            schema = unified
            varied |= {f.name for f in file_schema if not f.equals(first.field(f.name))}
        digest = _early_digest(path, identity) or sha256_file(path)
        if file_identity(os.stat(path)) != identity:
            raise InputError("input file changed while it was being hashed", path=path)
        files.append(InputFile(index, path, meta.num_rows, meta.num_row_groups, digest, identity))
    assert schema is not None
    cast_columns = tuple(f for f in schema if f.name in varied)
    if config.partitioning == "hive":
        partition = partition_columns(paths, below or {}, schema)
        files = [replace(f, partition=partition[f.path]) for f in files]
        for field, _ in partition[paths[0]]:
            schema = schema.append(field)
    if sum(f.rows for f in files) == 0:
        raise InputError("input is empty (0 rows)", path=paths[0] if len(paths) == 1 else None)
    _check_columns(schema, config, paths[0])
    emb = config.embedding
    if cast_columns:
        log.info("%d column(s) typed differently across the input files, read as one type: %s", len(cast_columns),
                 ", ".join(f"{f.name} as {f.type}{'' if f.nullable else ' not null'}" for f in cast_columns))
    if emb.source == "column":
        return InputPlan(tuple(files), schema, _list_width(schema, files, config.columns.embedding, emb.dim),
                         cast_columns=cast_columns)
    return InputPlan(tuple(files), schema, emb.dim, n_features=_list_width(schema, files, emb.features, None),
                     cast_columns=cast_columns)


def work_items(plan: InputPlan, rows_per_item: int) -> list[WorkItem]:
    items: list[WorkItem] = []
    for f in plan.files:
        meta = pq.ParquetFile(f.path).metadata
        first_group, first_row, rows = 0, 0, 0
        for group in range(f.row_groups):
            rows += meta.row_group(group).num_rows
            if rows >= rows_per_item or group == f.row_groups - 1:
                items.append(WorkItem(f.index, f.path, first_group, group + 1, first_row, f.identity, f.partition,
                                      plan.cast_columns))
                first_group, first_row, rows = group + 1, first_row + rows, 0
    return items


def read_batches(item: WorkItem, columns: list[str] | None, batch_size: int):
    """Yield (first_row, pyarrow.Table) slices of one work item, from the very file that was hashed."""
    try:
        raw = open(item.path, "rb")
    except OSError as exc:
        raise InputError(f"cannot read Parquet data: {exc.strerror}", path=item.path) from None
    with raw:
        if item.identity and file_identity(os.fstat(raw.fileno())) != item.identity:
            raise InputError("input file changed after it was hashed (replaced or rewritten between passes); "
                             "nothing published", path=item.path)
        yield from _read_open(raw, item, columns, batch_size)


def check_unchanged(plan: "InputPlan") -> None:
    """Exit 2 if any input is no longer the file that was hashed and scored."""
    for f in plan.files:
        try:
            identity = file_identity(os.stat(f.path))
        except OSError:
            identity = ()
        if identity != f.identity:
            raise InputError("input file changed during the scan; nothing published", path=f.path)


def _read_open(raw, item: WorkItem, columns: list[str] | None, batch_size: int):
    keys = {field.name for field, _ in item.partition}
    in_file = columns if columns is None or not keys else [c for c in columns if c not in keys]
    try:
        handle = pq.ParquetFile(raw)
        start = item.first_row
        groups = list(range(item.first_group, item.last_group))
        for batch in handle.iter_batches(batch_size=batch_size, row_groups=groups, columns=in_file):
            _check_text(batch, item.path)
            yield start, with_partition_columns(_cast_columns(pa.Table.from_batches([batch]), item.cast),
                                                item.partition, columns)
            start += batch.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"cannot read Parquet data: {one_line(exc)}", path=item.path) from None


def _cast_columns(table: pa.Table, cast: tuple) -> pa.Table:
    """The named columns as the plan's type where this file types them otherwise (``InputPlan.cast_columns``)."""
    import pyarrow.compute as pc

    for target in cast:
        i = table.schema.get_field_index(target.name)
        if i >= 0 and not table.schema.field(i).equals(target):
            table = table.set_column(i, target, pc.cast(decode_array(table.column(i)), target.type))
    return table


def _check_text(batch: pa.RecordBatch, path: str) -> None:
    """Every string value must be valid UTF-8 (Parquet readers do not check; pandas and GX would fail)."""
    for field, column in zip(batch.schema, batch.columns):
        value_type = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        if pa.types.is_string(value_type) or pa.types.is_large_string(value_type):
            try:
                (column.dictionary if pa.types.is_dictionary(field.type) else column).validate(full=True)
            except pa.ArrowInvalid:
                raise InputError("a value is not valid UTF-8 text", path=path, column=field.name) from None


def decoded(t: pa.DataType) -> pa.DataType:
    """The value type of a dictionary-encoded (categorical) column, else the type itself."""
    return t.value_type if pa.types.is_dictionary(t) else t


def decode_array(arr):
    """A dictionary-encoded (categorical) column as plain values; any other column as it is."""
    import pyarrow.compute as pc

    return pc.cast(arr, arr.type.value_type) if pa.types.is_dictionary(arr.type) else arr


_EARLY: dict[str, Future] = {}


def hash_early(inputs: list[str]) -> None:
    """Start hashing the local input files on a thread while the CLI imports the scan's modules (1-2 s
    of Python that holds the GIL; hashing releases it).  ``plan_inputs`` takes a digest only where the
    file's identity was the same before and after hashing and is the same at planning; anything else
    (a remote input, a missing file, a changed one) is hashed, or reported, by the plan as before."""
    try:
        paths = discover(inputs, report=False)  # the plan reports what it leaves out
    except (InputError, OSError):
        return
    pending = {path: Future() for path in paths if path not in _EARLY}
    _EARLY.update(pending)

    def work() -> None:
        for path, future in pending.items():
            try:
                before = file_identity(os.stat(path))
                digest = sha256_file(path)
                future.set_result((before, digest) if file_identity(os.stat(path)) == before else None)
            except Exception:  # noqa: BLE001 - the plan hashes it again and reports what is wrong
                future.set_result(None)

    threading.Thread(target=work, name="poisonguard-hash", daemon=True).start()  # a failed start exits at once


def _early_digest(path: str, identity: tuple) -> str | None:
    future = _EARLY.pop(path, None)
    result = future.result() if future is not None else None
    return result[1] if result is not None and result[0] == identity else None


def sha256_file(path: str, chunk: int = 16 << 20) -> str:
    """Large reads into one buffer: hashing releases the GIL, and a thread that hashes while the
    main thread works takes the GIL back once per chunk (with 1 MiB chunks, 1,000 waits per GB)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(max(1, min(chunk, os.fstat(handle.fileno()).st_size)))  # output parts are a few MB
        view = memoryview(buffer)
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _read_metadata(path: str) -> pq.FileMetaData:
    try:
        if os.path.getsize(path) == 0:
            raise InputError("file is empty (0 bytes), not a Parquet file", path=path)
        return pq.read_metadata(path)
    except InputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"not a readable Parquet file ({one_line(exc)})", path=path) from None


def _partition_hint(path: str, column: str, config: Config) -> str:
    """Where the column is a folder name's key (Hive partitioning, ``label=cat/part-0.parquet``)."""
    if config.partitioning == "none" and f"/{column}=" in f"/{path}".replace("\\", "/"):
        return (f"; the path names it as a folder ({column}=...): set partitioning: hive to read partition keys "
                "in folder names as columns")
    return ""


def _check_columns(schema: pa.Schema, config: Config, path: str) -> None:
    cols = config.columns
    names = collections.Counter(schema.names)
    twice = next((name for name in schema.names if names[name] > 1), None)
    if twice is not None:
        raise InputError(f"column name appears {names[twice]} times", path=path, column=twice)
    roles = (("id", cols.id), ("label", cols.label))
    if config.embedding.source == "column":
        roles += (("embedding", cols.embedding),)
    for role, name in roles:
        if name not in schema.names:
            raise InputError(f"missing {role} column (have: {', '.join(schema.names)}){_partition_hint(path, name, config)}",
                             path=path, column=name)
    id_type = decoded(schema.field(cols.id).type)
    if not (pa.types.is_integer(id_type) or pa.types.is_string(id_type) or pa.types.is_large_string(id_type)):
        raise InputError(f"id column must be integer or string, not {id_type}", path=path, column=cols.id)
    label_type = decoded(schema.field(cols.label).type)
    if not (pa.types.is_integer(label_type) or pa.types.is_string(label_type)
            or pa.types.is_large_string(label_type) or pa.types.is_boolean(label_type)):
        raise InputError(f"label column must be integer, string or boolean, not {label_type}",
                         path=path, column=cols.label)
    vector = config.vector_column
    role = "embedding" if config.embedding.source == "column" else "features"
    if vector not in schema.names:
        raise InputError(f"missing {role} column (have: {', '.join(schema.names)})", path=path, column=vector)
    vec_type = schema.field(vector).type
    if not (_is_list(vec_type) and (pa.types.is_floating(vec_type.value_type) or pa.types.is_integer(vec_type.value_type))):
        raise InputError(f"{role} column must be a list of numbers, not {vec_type}", path=path, column=vector)
    for name in schema.names:
        if is_added_column(name):
            raise InputError("column name is reserved for poisonguard's outputs", path=path, column=name)


MAX_WIDTH = 16384  # embedding dimensions / feature values per row; wider is exit 2, not a huge allocation


def _list_width(schema: pa.Schema, files: list[InputFile], column: str, declared: int | None) -> int:
    """A list column's width (the fixed size, the declared one, or the most common length), capped."""
    width = _width(schema, files, column, declared)
    if width < 1:
        raise InputError("vectors are empty (width 0): nothing to screen", path=files[0].path, column=column)
    if width > MAX_WIDTH:
        raise InputError(f"vectors of {width} values exceed the limit of {MAX_WIDTH}", path=files[0].path,
                         column=column)
    return width


def _width(schema: pa.Schema, files: list[InputFile], column: str, declared: int | None) -> int:
    col_type = schema.field(column).type
    fixed = col_type.list_size if pa.types.is_fixed_size_list(col_type) else None
    if declared is not None:
        if fixed is not None and fixed != declared:
            raise InputError(f"column has fixed size {fixed}, config declares embedding.dim={declared}",
                             path=files[0].path, column=column)
        return declared
    if fixed is not None:
        return fixed
    import pyarrow.compute as pc

    for f in files:
        for _, table in read_batches(WorkItem(f.index, f.path, 0, f.row_groups, 0, f.identity), [column], 4096):
            lengths = pc.list_value_length(table.column(0)).drop_null()
            if len(lengths):  # the most common length but 0 (empty lists are rows to quarantine), 0 if all are
                sized = lengths.filter(pc.greater(lengths, 0))
                return int(pc.mode(sized if len(sized) else lengths, n=1)[0]["mode"].as_py())
    raise InputError("cannot infer the vector width: every value is null; set embedding.dim",
                     path=files[0].path, column=column)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def unify_schemas(a: pa.Schema, b: pa.Schema) -> pa.Schema | None:
    """The one schema two files' columns are read as, where they differ only losslessly: a column
    categorical (dictionary-encoded) in one and plain in the other (pandas writes a ``category`` column
    so), integers or floats of different widths, 32- and 64-bit offsets of text, bytes and lists,
    fixed-size and variable lists, nullability.  None for any other difference (another column set or
    order, integers beside floats, text beside numbers, fixed-size lists of two sizes), which the plan
    refuses."""
    if a.names != b.names:
        return None
    fields = []
    for fa, fb in zip(a, b):
        common = fa.type if fa.type.equals(fb.type) else common_type(fa.type, fb.type)
        if common is None:
            return None
        fields.append(pa.field(fa.name, common, fa.nullable or fb.nullable, fa.metadata))
    return pa.schema(fields, metadata=a.metadata)


_SIGNED = (pa.int8(), pa.int16(), pa.int32(), pa.int64())
_UNSIGNED = (pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())
_FLOATS = (pa.float16(), pa.float32(), pa.float64())


def common_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The narrowest type both ``a`` and ``b`` convert to without loss (``unify_schemas``), else None."""
    a, b = decoded(a), decoded(b)
    if a.equals(b):
        return a
    for kind in (_SIGNED, _UNSIGNED, _FLOATS):
        if a in kind and b in kind:
            return kind[max(kind.index(a), kind.index(b))]
    if (a in _SIGNED and b in _UNSIGNED) or (a in _UNSIGNED and b in _SIGNED):
        signed, unsigned = (a, b) if a in _SIGNED else (b, a)
        needed = _UNSIGNED.index(unsigned) + 1  # the signed type one step wider holds every value
        return _SIGNED[max(_SIGNED.index(signed), needed)] if needed < len(_SIGNED) else None
    for narrow, wide in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary())):
        if {str(a), str(b)} == {str(narrow), str(wide)}:
            return wide
    if _is_list(a) and _is_list(b):
        value = common_type(a.value_type, b.value_type)
        if value is None:
            return None
        if pa.types.is_fixed_size_list(a) and pa.types.is_fixed_size_list(b):  # another width: another model
            return pa.list_(value, a.list_size) if a.list_size == b.list_size else None
        return pa.large_list(value) if pa.types.is_large_list(a) or pa.types.is_large_list(b) else pa.list_(value)
    return None


def _clashes(a: pa.Schema, b: pa.Schema) -> list[str]:
    """The columns both schemas hold and type with no common type (``common_type``), in ``a``'s order."""
    return [name for name in a.names if name in b.names and common_type(a.field(name).type, b.field(name).type) is None]


def _first_clash(a: pa.Schema, b: pa.Schema) -> str | None:
    """The first such column, if the type is the difference (the same columns in the same order)."""
    clashes = _clashes(a, b)
    return clashes[0] if clashes and a.names == b.names else None


def _schema_diff(a: pa.Schema, b: pa.Schema) -> str:
    only_a = [n for n in a.names if n not in b.names]
    only_b = [n for n in b.names if n not in a.names]
    parts = []
    if only_a:
        parts.append(f"missing {', '.join(only_a)}")
    if only_b:
        parts.append(f"extra {', '.join(only_b)}")
    parts += [f"column {name!r} is {b.field(name).type}, not {a.field(name).type} (no type holds both without loss)"
              for name in _clashes(a, b)]
    return "; ".join(parts) or "column order differs"
