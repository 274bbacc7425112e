"""The user's Great Expectations 1.x suite: loaded and checked on the driver, run per batch.

GX is imported lazily (only when a suite is configured), with analytics off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from poisonguard.errors import ConfigError, InputError, one_line
from poisonguard.names import suite_reason


MAX_SUITE_BYTES = 4 << 20
MAX_EXPECTATIONS = 1000
# Arguments Great Expectations evaluates as code or queries: row_condition goes to DataFrame.query
# (which can reach Python objects), whatever condition_parser says; unexpected_rows_query is SQL;
# $PARAMETER references are resolved at run time.  A screening suite may use none of them.
EVALUATED = ("row_condition", "condition_parser", "unexpected_rows_query", "$PARAMETER")


def load_suite_json(path: str) -> dict:
    try:
        if os.path.getsize(path) > MAX_SUITE_BYTES:
            raise ConfigError(f"expectation suite is larger than {MAX_SUITE_BYTES} bytes", path=path)
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read expectation suite: {exc.strerror}", path=path) from None
    except UnicodeDecodeError:
        raise ConfigError("expectation suite is not UTF-8 text", path=path) from None
    except RecursionError:
        raise ConfigError("expectation suite is nested too deeply", path=path) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"expectation suite is not valid JSON: {exc.msg} at line {exc.lineno}", path=path) from None
    if not isinstance(data, dict) or not isinstance(data.get("expectations"), list):
        raise ConfigError("expectation suite must be a JSON object with an 'expectations' list", path=path)
    if len(data["expectations"]) > MAX_EXPECTATIONS:
        raise ConfigError(f"expectation suite has {len(data['expectations'])} expectations; "
                          f"at most {MAX_EXPECTATIONS} are allowed", path=path)
    for number, exp in enumerate(data["expectations"], start=1):
        found = _evaluated_keys({k: v for k, v in exp.items() if k not in ("meta", "notes", "description")}
                                if isinstance(exp, dict) else {})
        if found:
            name = exp.get("type", "?")
            raise ConfigError(f"expectation {number} ({name}) uses {found[0]}, which Great Expectations evaluates "
                              "as code or a query; not allowed in a screening suite", path=path)
    return data


def _evaluated_keys(value) -> list[str]:
    if isinstance(value, dict):
        hits = [k for k in value if k in EVALUATED]
        return hits + [h for v in value.values() for h in _evaluated_keys(v)]
    if isinstance(value, list):
        return [h for v in value for h in _evaluated_keys(v)]
    return []


def suite_columns(suite: dict) -> list[str]:
    cols: list[str] = []
    for exp in suite["expectations"]:
        kwargs = exp.get("kwargs", {}) if isinstance(exp, dict) else {}
        kwargs = kwargs if isinstance(kwargs, dict) else {}  # (build_gx_suite refuses it, naming the expectation)
        for key in ("column", "column_A", "column_B"):
            if isinstance(kwargs.get(key), str):
                cols.append(kwargs[key])
        if isinstance(kwargs.get("column_list"), list):
            cols.extend(c for c in kwargs["column_list"] if isinstance(c, str))
    return list(dict.fromkeys(cols))


def load_suite(config, schema: pa.Schema) -> dict | None:
    """The configured suite, checked against the data's schema (None when none is configured)."""
    return check_suite(config.suite, schema) if config.suite else None


VECTOR_EXPECTATIONS = ("expect_vector_length_to_equal", "expect_vector_values_to_be_between")


def vector_expectations(suite: dict) -> list[dict]:
    """poisonguard's own expectations on list columns, kept in the suite's meta (GX ignores them)."""
    meta = suite.get("meta") if isinstance(suite.get("meta"), dict) else {}
    own = meta.get("poisonguard") if isinstance(meta.get("poisonguard"), dict) else {}
    return own.get("vectors") or []


def _check_vectors(suite: dict, schema: pa.Schema, path: str) -> None:
    for number, v in enumerate(vector_expectations(suite), start=1):
        where = f"meta.poisonguard.vectors[{number}]"
        if not isinstance(v, dict) or v.get("type") not in VECTOR_EXPECTATIONS:
            raise ConfigError(f"{where}: type must be one of {', '.join(VECTOR_EXPECTATIONS)}", path=path)
        column = v.get("column")
        if column not in schema.names:
            raise InputError(f"expectation suite {path} {where} names a column the data lacks", column=str(column))
        if v["type"] == "expect_vector_length_to_equal" and not (isinstance(v.get("value"), int) and v["value"] > 0):
            raise ConfigError(f"{where}: value must be a positive integer", path=path)
        if v["type"] == "expect_vector_values_to_be_between":
            lo, hi = v.get("min_value"), v.get("max_value")
            if not (isinstance(lo, list) and isinstance(hi, list) and len(lo) == len(hi) and lo
                    and all(isinstance(x, (int, float)) for x in lo + hi)):
                raise ConfigError(f"{where}: min_value and max_value must be equal-length lists of numbers", path=path)
            field_type = schema.field(column).type
            if pa.types.is_fixed_size_list(field_type) and field_type.list_size != len(lo):
                # bounds apply to the vectors of their length only: these would check no row
                raise ConfigError(f"{where}: {len(lo)} bounds for vectors of {field_type.list_size} values", path=path)


def vector_failures(table: pa.Table, expectation: dict) -> np.ndarray:
    """Rows of ``table`` failing one vector expectation (a null vector fails neither: not_null covers it)."""
    import pyarrow.compute as pc

    column = table.column(expectation["column"])
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    present = lengths >= 0
    if expectation["type"] == "expect_vector_length_to_equal":
        return present & (lengths != expectation["value"])
    lo, hi = np.asarray(expectation["min_value"], float), np.asarray(expectation["max_value"], float)
    fits = present & (lengths == len(lo))
    out = np.zeros(len(lengths), dtype=bool)
    if fits.any():
        values = pc.cast(column.filter(pa.array(fits)).flatten(), pa.float64()).to_numpy(zero_copy_only=False)
        values = values.reshape(-1, len(lo))
        with np.errstate(invalid="ignore"):
            out[np.flatnonzero(fits)] = ((values < lo) | (values > hi) | ~np.isfinite(values)).any(axis=1)
    return out


def check_suite(path: str, schema: pa.Schema) -> dict:
    """Load and check a suite on the driver: JSON, known expectation types, columns that exist."""
    suite = load_suite_json(path)
    for col in suite_columns(suite):
        if col not in schema.names:
            raise InputError(f"expectation suite {path} names a column the data lacks", column=col)
    _check_vectors(suite, schema, path)
    build_gx_suite(suite, path)
    return suite


def build_gx_suite(suite: dict, path: str = "suite"):
    quiet_gx()
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    # GX logs and drops an expectation it cannot build; a screening tool must refuse instead.
    for number, exp in enumerate(suite["expectations"], start=1):
        try:
            if not isinstance(exp, dict) or not isinstance(exp.get("type"), str):
                raise ValueError("each expectation needs a 'type'")
            ExpectationConfiguration(type=exp["type"], kwargs=exp.get("kwargs", {})).to_domain_obj()
        except Exception as exc:  # noqa: BLE001 - GX raises many types for a bad expectation
            name = exp.get("type") if isinstance(exp, dict) else exp
            raise ConfigError(f"invalid expectation suite: expectation {number} ({name}): {one_line(exc)}",
                              path=path) from None
    try:
        return gx.ExpectationSuite(**suite)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"invalid expectation suite: {one_line(exc)}", path=path) from None


def quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import logging

    logging.getLogger("great_expectations").setLevel(logging.ERROR)


def raised_exception(info) -> str | None:
    """The message of an exception GX caught while running an expectation, or None.  GX 1.x reports
    it at the top of ``exception_info`` or, for a metric that failed to resolve (an invalid regular
    expression), once per metric configuration: such an expectation has checked nothing."""
    if not isinstance(info, dict):
        return None
    for entry in [info, *info.values()]:
        if isinstance(entry, dict) and entry.get("raised_exception"):
            return str(entry.get("exception_message") or "an exception")
    return None


class SuiteRunner:
    """Runs a GX suite on pandas batches; built once per worker (DoFn.setup), GX imported lazily."""

    def __init__(self, suite: dict, path: str = "suite"):
        self.suite_dict = suite
        self.path = path
        self.columns = suite_columns(suite)
        self._batch_definition = None
        self._suite = None

    def _setup(self):
        quiet_gx()
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        asset = context.data_sources.add_pandas("poisonguard").add_dataframe_asset("batch")
        self._batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        self._suite = build_gx_suite(self.suite_dict, self.path)

    def failures(self, table: pa.Table) -> tuple[dict[str, np.ndarray], list[str]]:
        """Per row-level expectation a mask of failing rows; batch-level failures as messages."""
        masks: dict[str, np.ndarray] = {}
        for v in vector_expectations(self.suite_dict):
            failed = vector_failures(table, v)
            if failed.any():
                reason = suite_reason(v["type"], v["column"])
                masks[reason] = masks.get(reason, np.zeros(len(failed), bool)) | failed
        if not self.suite_dict["expectations"]:
            return masks, []
        if self._batch_definition is None:
            self._setup()
        frame = table.select(self.columns).to_pandas() if self.columns else table.slice(0, 0).to_pandas()
        frame.index = np.arange(len(frame))
        batch = self._batch_definition.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(self._suite, result_format={"result_format": "COMPLETE"})
        messages: list[str] = []
        for res in result.results:
            conf = res.expectation_config
            column = conf.kwargs.get("column") or "table"
            raised = raised_exception(res.exception_info)
            if raised is not None:
                raise InputError(f"expectation {conf.type} failed to run: {one_line(raised)}", path=self.path,
                                 column=column)
            if res.success:
                continue
            index = res.result.get("unexpected_index_list")
            if index is None:
                messages.append(f"{conf.type}:{column}")
                continue
            mask = np.zeros(len(frame), dtype=bool)
            mask[np.asarray(index, dtype=np.int64)] = True
            reason = suite_reason(conf.type, column)
            masks[reason] = masks.get(reason, np.zeros(len(frame), bool)) | mask
        return masks, messages
