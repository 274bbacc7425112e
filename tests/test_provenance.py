"""The hash-chained provenance log: intact logs verify; edits, removals, swaps are named."""

from __future__ import annotations

import json
import threading

from conftest import run_cli
from poisonguard import provenance as prov


def _log(tmp, n=5):
    path = tmp / "log.jsonl"
    for i in range(n):
        prov.append(str(path), prov.run_event("START", f"run-{i}", facets={"poisonguard_test": {"i": i}}))
    return path


def test_intact_log_verifies(tmp):
    path = _log(tmp)
    assert prov.verify(str(path))[0]
    code, stdout, _ = run_cli("verify-log", path)
    assert code == 0 and "5 records" in stdout


def _tamper(path, edit):
    """Apply ``edit`` to the log's lines, then run verify-log on it."""
    lines = path.read_bytes().splitlines(keepends=True)
    edit(lines)
    path.write_bytes(b"".join(lines))
    return run_cli("verify-log", path)


def test_one_changed_byte_is_named(tmp):
    def change(lines):
        lines[2] = lines[2].replace(b'"run-2"', b'"run-X"')

    code, stdout, _ = _tamper(_log(tmp), change)
    assert code == 1 and "record 2 (line 3)" in stdout and "edited" in stdout


def test_removed_record_is_named(tmp):
    def remove(lines):
        del lines[1]

    code, stdout, _ = _tamper(_log(tmp), remove)
    assert code == 1 and "line 2" in stdout and "expected record 1" in stdout


def test_swapped_records_are_named(tmp):
    def swap(lines):
        lines[1], lines[3] = lines[3], lines[1]

    code, stdout, _ = _tamper(_log(tmp), swap)
    assert code == 1 and "line 2" in stdout


def test_inserted_record_is_named(tmp):
    path = _log(tmp)
    lines = path.read_bytes().splitlines(keepends=True)
    forged = json.loads(lines[1])
    forged["run"]["facets"]["poisonguard_run"]["run_id"] = "forged"
    forged["run"]["facets"]["poisonguard_chain"]["record_sha256"] = prov.record_hash(forged)
    lines.insert(2, prov.canonical(forged) + b"\n")
    path.write_bytes(b"".join(lines))
    code, stdout, _ = run_cli("verify-log", path)
    assert code == 1 and "line 3" in stdout


def test_concurrent_appends_keep_the_chain(tmp):
    path = str(tmp / "shared.jsonl")

    def writer(k):
        for i in range(20):
            prov.append(path, prov.run_event("START", f"w{k}-{i}"))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok, message = prov.verify(path)
    assert ok, message
    assert "80 records" in message


def test_a_log_path_that_is_a_folder_or_ends_in_a_foreign_record_is_bad_input(tmp):
    """Scan and review name the log and the problem (exit 2), nothing published; a last line that is
    valid JSON but not an object, and a folder for a log, each ended in an internal error (exit 3)."""
    from conftest import error_lines, gaussian_table, write

    data = write(gaussian_table(40, 2, 3), tmp / "d.parquet")
    (tmp / "logs").mkdir()
    path = _log(tmp, 2)
    with path.open("ab") as handle:
        handle.write(b"[1, 2]\n")
    for log, needle in ((tmp / "logs", "is a folder"), (path, "not a poisonguard record")):
        code, _, stderr = run_cli("scan", data, "--out", tmp / "run", "--provenance-log", log, "--quiet")
        assert code == 2, stderr
        assert needle in error_lines(stderr)[0] and not (tmp / "run").exists()
