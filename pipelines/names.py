"""Every name that crosses a module or process boundary: output columns, reasons, run-folder files.

Writers and readers (engines, report, review, CLI, tests) import these; no other module spells them.
"""

from __future__ import annotations

import re

# ---- output columns ----------------------------------------------------------------------
SCORE_PREFIX = "score_"
QUARANTINE_REASONS = "quarantine_reasons"
RUN_ID = "run_id"
REVIEW_STATUS = "review_status"  # "released" / "confirmed" where a logged review decided the row, else null
DECISION_STATUS = {"release": "released", "confirm": "confirmed"}  # a review decision -> the row's status
ADDED_COLUMNS = (REVIEW_STATUS, QUARANTINE_REASONS, RUN_ID)
SCREEN_ROW = "_poisonguard_screen_row"  # poisonguard.screen(): each row's position in the caller's data
RESERVED_PREFIXES = (SCORE_PREFIX,)


def score_column(detector: str) -> str:
    return SCORE_PREFIX + detector


def is_added_column(name: str) -> bool:
    """True for a column poisonguard adds to the input's (scores, reasons, run id)."""
    return name in ADDED_COLUMNS or name.startswith(RESERVED_PREFIXES)


# ---- reasons -----------------------------------------------------------------------------
VALIDATION = "validation:"
BUILTIN = VALIDATION + "builtin:"
DETECTOR = "detector:"
REVIEW_CONFIRMED = "review:confirmed"

ID_MISSING = BUILTIN + "id_missing"
ID_RESERVED = BUILTIN + "id_reserved"
CANARY_PREFIX = "__poisonguard_canary__"  # ids of the canary self-test's synthetic rows; no input row may use it
ID_DUPLICATE = BUILTIN + "id_duplicate"
LABEL_MISSING = BUILTIN + "label_missing"
ROW_LOCAL_CHECKS = ("id_missing", "label_missing", "features_invalid", "embedding_missing", "embedding_dim",
                    "embedding_finite", "embedding_magnitude")


def builtin_reason(check: str) -> str:
    return BUILTIN + check


def suite_reason(expectation: str, column: str) -> str:
    return f"{VALIDATION}{expectation}:{column}"


def detector_reason(detector: str) -> str:
    return DETECTOR + detector


def reason_rank(reason: str) -> tuple[int, str]:
    """Order in which a row's reasons are listed: built-in checks, suite, detectors, review."""
    if reason.startswith(BUILTIN):
        return (0, reason)
    if reason.startswith(VALIDATION):
        return (1, reason)
    if reason.startswith(DETECTOR):
        return (2, reason)
    return (3, reason)


# ---- run folder --------------------------------------------------------------------------
CLEAN = "clean"
QUARANTINE = "quarantine"
OUTPUT_FOLDERS = (CLEAN, QUARANTINE)
SUMMARY = "summary.json"
REPORT = "report.html"
REVIEW_CSV = "review.csv"
RUN_PROVENANCE = "provenance.jsonl"
PROXY_MODEL = "proxy_model.pt"
SUCCESS = "_SUCCESS"
MANIFEST = "MANIFEST.json"  # an object-store run's file list (run/remote.py)
WORK = "_work"
REPORT_SAMPLE = "report_sample"  # under WORK: the report's clean-sample candidates (core/report_sample.py)
DEFAULT_LOG = "poisonguard-provenance.jsonl"

_PART = re.compile(r"part-(\d+)-(\d+)\.parquet$")


def part_name(file_index: int, first_row: int) -> str:
    """The part file holding the rows of input file ``file_index`` from row ``first_row`` on."""
    return f"part-{file_index:05d}-{first_row:012d}.parquet"


EMPTY_PART = "part-empty.parquet"


def spill_name(file_index: int, first_row: int) -> str:
    """The file holding the embeddings pass 1 computed for a batch (model and proxy modes)."""
    return f"embeddings-{file_index:05d}-{first_row:012d}.arrow"


def part_source(name: str) -> int | None:
    """The input file index a part file's rows came from (None for the empty placeholder)."""
    match = _PART.search(name)
    return int(match.group(1)) if match else None


def input_labels(paths: list[str]) -> list[str]:
    """How the report and review.csv name each input: its path below the inputs' common folder (a
    Hive lake's files all share one name: ``day=.../label=.../part-0.parquet`` tells them apart);
    a lone input, its file name."""
    import posixpath

    if len(paths) < 2:
        return [posixpath.basename(p) for p in paths]
    try:
        root = posixpath.commonpath(paths)
    except ValueError:  # a mix of absolute and relative paths: full paths
        return list(paths)
    return [posixpath.relpath(p, root) for p in paths]


def safe_name(run_id: str) -> str:
    """A run id as it may appear in a file name: itself when already file-safe, else its safe
    characters and a hash of the whole id (so distinct ids never share a name)."""
    import hashlib

    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", run_id):
        return run_id
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._")[:80] or "run"
    return f"{stem}-{hashlib.sha256(run_id.encode()).hexdigest()[:12]}"
