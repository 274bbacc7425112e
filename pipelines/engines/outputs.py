"""What an engine hands back to the run: part files in the staging folder, and one EngineResult.

Both engines write a block's rows with ``write_block``; the Beam engine's results leave the
pipeline through ``save_result`` (one JSON file per key in the staging folder's work area, the
only way out of a distributed runner) and reach the driver through ``load_result``.  A worker's
own error (bad input found while reading, say) goes the same way (``reporting_errors``), since
runners that run workers in other processes hand back only its text.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from poisonguard.errors import InputError, IntegrityError, PoisonguardError, one_line
from poisonguard.names import CLEAN, QUARANTINE, REPORT_SAMPLE, WORK, part_name

RESULT_KEYS = ("counts", "fit", "moments", "copies")
ERROR = "error.json"


@dataclass
class EngineResult:
    counts: dict  # merged block statistics: rows, clean, quarantined, reasons, classes, ...
    fit: dict  # per-detector fit report (parameters, per-class decisions)
    moments: dict  # per-class rows, shares, means and covariance traces (drift baselines)
    copies: dict  # the groups of exact copies (``core.copies.CopyGroups.report``)


def write_block(staging: str, file_index: int, first_row: int, clean: pa.Table, held: pa.Table,
                sample: pa.Table | None = None) -> None:
    """The block's part files; ``sample``: the report's clean-sample candidates, kept in the work
    folder (``core.report_sample``), which the publish leaves behind."""
    name = part_name(file_index, first_row)
    for folder, table in ((CLEAN, clean), (QUARANTINE, held)):
        if table.num_rows:
            _write_atomically(table, os.path.join(staging, folder, name))
    if sample is not None and sample.num_rows:
        folder = os.path.join(staging, WORK, REPORT_SAMPLE)
        os.makedirs(folder, exist_ok=True)
        _write_atomically(sample, os.path.join(folder, name))


def _write_atomically(table: pa.Table, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        pq.write_table(table, tmp, use_dictionary=dictionary_columns(table.schema))
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot write the outputs: {getattr(exc, 'strerror', None) or one_line(exc)}",
                         path=path) from None


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: not floats or lists (embeddings, features, scores), whose
    values rarely repeat; trying a dictionary on them first cost 60% of the score pass's write time."""
    def repeats(t: pa.DataType) -> bool:
        return not (pa.types.is_floating(t) or pa.types.is_list(t) or pa.types.is_fixed_size_list(t)
                    or pa.types.is_large_list(t))
    return [field.name for field in schema if repeats(field.type)]


def save_result(staging: str, key: str, value: dict) -> None:
    assert key in RESULT_KEYS, key
    with open(os.path.join(staging, WORK, f"{key}.json"), "w", encoding="utf-8") as handle:
        json.dump(value, handle)


def load_result(staging: str) -> EngineResult:
    values = {}
    for key in RESULT_KEYS:
        with open(os.path.join(staging, WORK, f"{key}.json"), encoding="utf-8") as handle:
            values[key] = json.load(handle)
    return EngineResult(**values)


@contextlib.contextmanager
def reporting_errors(staging: str):
    """Record a poisonguard error raised inside a worker for the driver (the first one wins)."""
    try:
        yield
    except PoisonguardError as exc:
        record = {"kind": "input" if isinstance(exc, InputError) else "integrity", "message": str(exc)}
        try:
            fd = os.open(os.path.join(staging, WORK, ERROR), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
        except OSError:
            pass
        raise


def load_error(staging: str) -> PoisonguardError | None:
    try:
        with open(os.path.join(staging, WORK, ERROR), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return (InputError if record.get("kind") == "input" else IntegrityError)(str(record.get("message")))
