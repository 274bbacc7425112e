"""poisonguard's command line, a thin shell over ``poisonguard.api``.  Unknown scan flags go to Beam."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from poisonguard.errors import PoisonguardError, one_line

EPILOG_SCAN = """\
exit codes: 0 scan done, within policy; 1 scan done, quarantined share over fail_on (outputs published);
2 bad invocation, config or input (nothing published); 3 internal invariant broken (nothing published).
Flags not listed here go to Beam's PipelineOptions, e.g. --runner DirectRunner
--direct_running_mode multi_processing --direct_num_workers 4, or --runner DataflowRunner --project ...
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poisonguard", allow_abbrev=False,
        description="Screen a training dataset (Parquet) for poisoning: validate rows, run poisoning detectors "
                    "on per-row embeddings, write clean and quarantined rows and a provenance log.",
    )
    from poisonguard import __version__

    parser.add_argument("--version", action="version", version=f"poisonguard {__version__}")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="stderr log lines as text, or one JSON object per line (ts, level, run_id, phase, msg)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    scan = sub.add_parser("scan", help="scan Parquet inputs into RUN_DIR", epilog=EPILOG_SCAN, allow_abbrev=False,
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="Scan INPUT (files, folders or globs of Parquet) and publish RUN_DIR atomically.")
    scan.add_argument("inputs", nargs="+", metavar="INPUT", help="Parquet file, folder or glob")
    scan.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder to publish (replaced atomically)")
    scan.add_argument("--config", metavar="FILE", help="YAML config (see configs/example.yaml)")
    scan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, dotted (e.g. --set fail_on=0.05 --set columns.label=y)")
    scan.add_argument("--provenance-log", metavar="FILE",
                      help="long-lived provenance log (default: poisonguard-provenance.jsonl beside RUN_DIR)")
    scan.add_argument("--run-id", help="run id to use instead of a fresh UUID")
    scan.add_argument("--state", metavar="DIR", help="state folder: reviewer decisions and drift baselines (config: state)")
    scan.add_argument("--engine", choices=("auto", "memory", "beam"),
                      help="auto (default): in memory for small runs without Beam flags, else Beam (config: engine)")
    scan.add_argument("--accept-mass-quarantine", action="store_true",
                      help="apply a detector even where it would flag >= 5%% of most classes (config: accept_mass_quarantine)")
    scan.add_argument("--canaries", action="store_true",
                      help="self-test: measure the detectors' recall on this data with synthetic poison (config: canaries)")
    scan.add_argument("--quiet", action="store_true", help="print no summary (exit 1 still says why in one line)")
    scan.add_argument("--output", choices=("text", "json"), default="text",
                      help="json: the last stdout line is one JSON object (verdict, exit code, counts, paths), "
                           "e.g. for an Airflow XCom")

    review = sub.add_parser("review", help="record release/confirm decisions on a run's quarantine",
                            description="Record reviewers' decisions (CSV or Parquet: id, decision = release | "
                                        "confirm, note) in the state folder and the provenance log. Every "
                                        "decision is checked first; nothing is applied unless all are valid.")
    review.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, or a published run on object storage (its --out URI)")
    review.add_argument("--decisions", required=True, metavar="FILE",
                        help="review.csv filled in, or a Parquet file (a path or a URI)")
    review.add_argument("--reviewer", required=True, metavar="NAME")
    review.add_argument("--state", metavar="DIR", help="state folder (default: the run's configured state)")
    review.add_argument("--provenance-log", metavar="FILE", help="default: the run's provenance log")
    review.add_argument("--dry-run", action="store_true",
                        help="check every decision and say what would be recorded; write nothing")

    report = sub.add_parser("report", help="re-render RUN_DIR/report.html",
                            description="Re-render report.html and review.csv, with the decisions reviewed since the scan.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, or a published run on object storage (its --out URI)")
    report.add_argument("--to", metavar="DIR", help="write report.html and review.csv here (a folder or a URI) instead "
                                                    "of into RUN_DIR; needed where RUN_DIR is on object storage, whose "
                                                    "published run is never rewritten")
    report.add_argument("--provenance-log", metavar="FILE",
                        help="the log whose COMPLETE record the quarantine files are checked against "
                             "(default: the one the run's summary names)")

    suite = sub.add_parser("suite", help="work with expectation suites", description="Work with expectation suites.")
    suite_sub = suite.add_subparsers(dest="suite_command", required=True, metavar="SUITE_COMMAND")
    infer = suite_sub.add_parser("infer", help="infer a GX 1.x suite from trusted Parquet data",
                                 description="Write a GX 1.x suite of row-level expectations inferred from trusted "
                                             "data; every expectation says in its meta what it was inferred from.")
    infer.add_argument("inputs", nargs="+", metavar="TRUSTED", help="trusted Parquet file, folder or glob (a path or a URI)")
    infer.add_argument("--out", required=True, metavar="FILE",
                       help="suite JSON to write, e.g. expectations/NAME.json (a path or a URI)")
    infer.add_argument("--config", metavar="FILE", help="YAML config (column names)")
    infer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, dotted (e.g. --set columns.label=y --set partitioning=hive)")
    infer.add_argument("--strictness", choices=("loose", "normal", "strict"), default="normal",
                       help="how tight the ranges are (default normal: the trusted data always passes)")
    infer.add_argument("--name", help="suite name (default: the output file's stem)")

    verify = sub.add_parser("verify-log", help="check a provenance log's hash chain",
                            description="Exit 0 if the log is intact, 1 naming the first bad record.")
    verify.add_argument("log", metavar="FILE")
    verify.add_argument("--head", metavar="SHA256",
                        help="a head hash a scan printed, kept outside the log: catches a rewritten log or a cut tail")
    return parser


class _QuietThirdParty(logging.Filter):
    """Drop GX's chatter and Beam's optional-dependency notices; keep real warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("great_expectations") and record.levelno < logging.ERROR:
            return False
        if record.name.startswith("apache_beam") and not os.environ.get("POISONGUARD_DEBUG"):
            return False  # worker failures come back to the driver and are reported in one line
        return "apitools not found" not in record.getMessage()


def _configure_logging(fmt: str = "text") -> None:
    """The command owns its process: poisonguard's progress at INFO, other libraries' warnings only."""
    from poisonguard.observe import Context, JsonLines

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines() if fmt == "json" else logging.Formatter("[%(name)s] %(message)s"))
    handler.addFilter(_QuietThirdParty())
    handler.addFilter(Context())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("poisonguard").setLevel(logging.INFO)


class Terminated(BaseException):
    """SIGTERM (what schedulers send to stop a task), raised where the scan is, like Ctrl-C."""


_received: list[int] = []
_STARTED: float | None = None  # when this command started: its clock for timings.total_s  # the signal that stopped the run: Beam may wrap the exception it raised


def _on_signal(signum, frame):
    import signal

    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


STOP_GRACE_S = 20.0  # after Ctrl-C or SIGTERM, how long the run may take to stop before it is ended


def _stop_watchdog(signals) -> tuple:
    """A daemon thread that hears Ctrl-C and SIGTERM through the signal wakeup fd, which the C-level
    handler writes even while the main thread is blocked in a native call (an object store's retry
    loop, a long BLAS call) and cannot run the Python handler that raises the interrupt.  If the run
    has not stopped ``STOP_GRACE_S`` after the signal, it is ended there: nothing was published (the
    publish is a rename at the end), its staging folder is removed by the next scan.
    Returns (the previous wakeup fd, the sockets, the run's "stopped" event) for ``_end_watchdog``."""
    import signal
    import socket
    import threading

    receiver, sender = socket.socketpair()
    sender.setblocking(False)
    previous = signal.set_wakeup_fd(sender.fileno(), warn_on_full_buffer=False)
    wanted = {int(s) for s in signals}
    stopped = threading.Event()

    def watch():
        while True:
            try:
                data = receiver.recv(64)
            except OSError:
                return
            if not data:
                return
            hit = next((b for b in data if b in wanted), None)
            if hit is None:
                continue
            if stopped.wait(STOP_GRACE_S):
                return
            code = 143 if hit == signal.SIGTERM else 130
            os.write(2, f"poisonguard: {'terminated (SIGTERM)' if code == 143 else 'interrupted'} and still "
                        f"running after {STOP_GRACE_S:.0f} s (blocked in a native call); ended, nothing "
                        "published\n".encode())
            os._exit(code)

    threading.Thread(target=watch, name="poisonguard-stop-watchdog", daemon=True).start()
    _WATCHING[0] = True
    return previous, receiver, sender, stopped


_WATCHING = [False]  # whether this process's wakeup fd is a watchdog's


def _forget_watchdog_in_child() -> None:
    """A forked child inherits the wakeup fd but not the watchdog: a signal sent to the child alone
    (a pool stopping its workers) must not read as one sent to the scan."""
    import signal

    if _WATCHING[0]:
        _WATCHING[0] = False
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(-1)


os.register_at_fork(after_in_child=_forget_watchdog_in_child)


def _end_watchdog(watchdog: tuple) -> None:
    import signal

    previous, receiver, sender, stopped = watchdog
    stopped.set()
    _WATCHING[0] = False
    signal.set_wakeup_fd(previous)
    sender.close()
    receiver.close()


def _stopped_by_signal() -> int | None:
    """The exit code of a run a signal stopped (130 Ctrl-C, 143 SIGTERM), else None."""
    import signal

    if not _received:
        return None
    if _received[0] == signal.SIGTERM:
        print("poisonguard: terminated (SIGTERM); nothing published", file=sys.stderr)
        return 143
    print("poisonguard: interrupted; nothing published", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    import signal
    import time

    global _STARTED
    _STARTED = time.monotonic()
    import threading

    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    os.umask(0o027)  # run folders and logs are not world-readable
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    _configure_logging(args.log_format)
    previous, watchdog = {}, None
    _received.clear()
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        watchdog = _stop_watchdog(previous)
    try:
        if args.command == "scan":
            return _scan(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "review":
            return _review(args)
        if args.command == "report":
            return _report(args)
        if args.command == "suite":
            return _suite_infer(args)
        return _verify(args)
    except PoisonguardError as exc:
        if _received:
            return _stopped_by_signal()
        print(f"poisonguard: error: {one_line(exc)}", file=sys.stderr)
        if getattr(args, "output", "text") == "json":
            print(json.dumps({"exit_code": exc.exit_code, "verdict": "error", "error": one_line(exc)}))
        return exc.exit_code
    except (KeyboardInterrupt, Terminated) as exc:
        if not _received:  # raised without our handler (another thread's default handler, say)
            _received.append(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        return _stopped_by_signal()
    except Exception as exc:  # noqa: BLE001 - the user gets one line, the traceback on demand
        if _received:  # a runner wrapped the interrupt it was given
            return _stopped_by_signal()
        if os.environ.get("POISONGUARD_DEBUG"):
            raise
        print(f"poisonguard: internal error: {type(exc).__name__}: {one_line(exc)[:500]} "
              "(nothing published; set POISONGUARD_DEBUG=1 for the traceback)", file=sys.stderr)
        return 3
    finally:
        if watchdog is not None:
            _end_watchdog(watchdog)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _scan(args, beam_args: list[str]) -> int:
    from poisonguard.io import hash_early

    hash_early(args.inputs)  # overlaps the imports below
    from poisonguard.api import scan
    from poisonguard.config import load_config
    from poisonguard.run.summary import console_summary

    overrides = list(args.overrides)
    if args.engine:
        overrides.append(f"engine={args.engine}")
    if args.canaries:
        overrides.append("canaries.enabled=true")
    if args.accept_mass_quarantine:
        overrides.append("accept_mass_quarantine=true")
    config = load_config(args.config, overrides)
    _check_beam_args(beam_args)
    result = scan(args.inputs, args.out, config, state=args.state, provenance_log=args.provenance_log,
                  run_id=args.run_id, beam_args=beam_args, clock_start=_STARTED)
    summary = result.summary
    if not args.quiet:
        print(console_summary(summary, result.outputs_dir or result.run_dir))
    elif result.exit_code == 1:
        print(f"poisonguard: {why_exit_1(summary)}", file=sys.stderr)
    if args.output == "json":
        print(json.dumps({"run_id": result.run_id, "verdict": result.verdict, "exit_code": result.exit_code,
                          "counts": result.counts, "paths": {"run_dir": result.run_dir, **result.paths},
                          "provenance_head": summary["provenance"]["head"],
                          "reason": why_exit_1(summary) if result.exit_code == 1 else None}, default=str))
    return result.exit_code


def why_exit_1(summary: dict) -> str:
    counts, parameters = summary["counts"], summary["parameters"]
    if summary["verdict"] == "over_fail_on":
        return f"over fail_on: {100 * counts['quarantined_share']:.2f}% > {100 * parameters['fail_on']:.2f}%"
    canaries = summary.get("canaries") or {}
    if canaries.get("recall") is None:
        return f"canaries.min_recall {canaries.get('min_recall')} not met: {canaries.get('why', 'no recall measured')}"
    return f"canary recall {canaries['recall']:.2f} < canaries.min_recall {canaries.get('min_recall')}"


def _check_beam_args(beam_args: list[str]) -> None:
    """Flags poisonguard does not define must be Beam's; a typo is an error, never silently ignored."""
    import difflib

    from poisonguard.errors import InputError

    stray = [a for a in beam_args if not a.startswith("-")]
    if stray and not any(a.startswith("--") for a in beam_args):
        raise InputError(f"unexpected argument(s) {' '.join(stray)}")
    if not beam_args:
        return
    from apache_beam.options.pipeline_options import PipelineOptions

    if any(a.lstrip("-").startswith("dask") or a.endswith("DaskRunner") for a in beam_args):
        try:  # Beam registers DaskOptions (--dask_client_address, ...) only once its Dask runner is imported
            import apache_beam.runners.dask.dask_runner  # noqa: F401
        except ImportError:
            raise InputError("the Dask runner needs dask.distributed: pip install 'poisonguard[dask]'") from None
    known = _beam_flags(PipelineOptions)
    ours = [a for action in _parser()._subparsers._group_actions[0].choices["scan"]._actions
            for a in action.option_strings if a.startswith("--")]
    for arg in beam_args:
        if not arg.startswith("-"):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if name.replace("-", "_") not in known:
            close = difflib.get_close_matches(arg.split("=", 1)[0], ours + [f"--{k}" for k in known], n=1, cutoff=0.7)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise InputError(f"unknown flag {arg.split('=', 1)[0]} (neither poisonguard's nor Beam's){hint}")


def _beam_flags(options_class) -> set[str]:
    """Every flag Beam's registered option classes define, as typed less its dashes (a flag's name can
    differ from where Beam stores it: --dask_client_address is stored as ``address``)."""
    from apache_beam.options.pipeline_options import _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in options_class.__subclasses__()}.values():  # as Beam's get_all_options
        cls._add_argparse_args(parser)
    return {flag.lstrip("-").replace("-", "_") for action in parser._actions for flag in action.option_strings}


def _run_summary(run_dir: str) -> dict:
    from poisonguard.run.summary import read_summary

    return read_summary(run_dir)


def _review(args) -> int:
    from poisonguard.errors import InputError
    from poisonguard.review import apply_review
    from poisonguard import storage
    from poisonguard.run.remote import local_file, mirrored, run_folder

    with run_folder(args.run_dir, clean=False) as (run_dir, clean_ids), local_file(args.decisions) as decisions:
        summary = _run_summary(run_dir)
        state = args.state or summary["parameters"].get("state")
        if not state:
            raise InputError("no state folder: pass --state DIR (or set state in the scan's config)")
        log_path = args.provenance_log or summary.get("provenance", {}).get("log")
        with mirrored(state, log_path, write_back=not args.dry_run) as (local_state, local_log):
            counts = apply_review(run_dir, decisions, args.reviewer, local_state, local_log, clean_ids, args.dry_run)
    if args.dry_run:
        print(f"dry run, nothing written: every decision is valid; {counts['release']} release and {counts['confirm']} "
              f"confirm decision(s) would be recorded in {storage.display(state)} and logged to "
              f"{storage.display(log_path)}; {counts['unchanged']} already recorded")
        return 0
    print(f"recorded {counts['release']} release and {counts['confirm']} confirm decision(s) in {storage.display(state)}, "
          f"logged to {storage.display(log_path)}; {counts['unchanged']} already recorded; {counts['undecided']} quarantined "
          "row(s) still undecided")
    return 0


def _report(args) -> int:
    import pyarrow as pa

    from poisonguard import storage
    from poisonguard.errors import InputError
    from poisonguard.names import REPORT, REVIEW_CSV
    from poisonguard.report import render_report
    from poisonguard.run.remote import local_file, run_folder
    from poisonguard.workbench import build_table, write_review_csv

    if storage.is_remote(args.run_dir) and not args.to:
        raise InputError("a published run on object storage is not rewritten: pass --to DIR for the re-rendered "
                         "report.html and review.csv", path=storage.display(args.run_dir))
    with run_folder(args.run_dir) as (run_dir, _), tempfile.TemporaryDirectory(prefix="poisonguard-") as tmp, \
            contextlib.ExitStack() as stack:
        summary = _run_summary(run_dir)
        log_path = args.provenance_log or (summary.get("provenance") or {}).get("log")
        local_log = stack.enter_context(local_file(log_path, missing_ok=True))
        integrity = _check_against_log(run_dir, summary, log_path, local_log)
        try:  # with the decisions reviewed since the scan
            table = build_table(run_dir, summary, from_log=local_log)
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"the run's quarantine files are unreadable (changed since the scan?): "
                             f"{str(exc).splitlines()[0][:200]}", path=storage.display(args.run_dir)) from None
        out = tmp if storage.is_remote(args.to) else (args.to or run_dir)
        os.makedirs(out, exist_ok=True)
        write_review_csv(out, table)
        shown = storage.display(args.run_dir) if storage.is_remote(args.run_dir) else str(Path(args.run_dir).resolve())
        render_report(run_dir, table, integrity=integrity, out_dir=out, shown_as=shown)
        for name in (REVIEW_CSV, REPORT):
            if storage.is_remote(args.to):
                storage.upload(os.path.join(out, name), storage.join(args.to, name))
    where = args.to or args.run_dir
    print(storage.display(storage.join(where, REPORT)) if storage.is_remote(where) else os.path.join(where, REPORT))
    return 0


def _check_against_log(run_dir: str, summary: dict, log_path: str | None, local_log: str | None) -> dict:
    """A re-rendered report shows the quarantine files its COMPLETE record hashed, or says it could not
    check them (a run folder moved away from its log): exit 2 when they differ, as ``review``."""
    from poisonguard import storage
    from poisonguard.review import check_published

    if local_log is None:
        shown = storage.display(log_path) if log_path else "none recorded"
        line = f"quarantine files NOT checked against the provenance log ({shown} is not there; pass --provenance-log)"
        print(f"poisonguard: warning: {line}", file=sys.stderr)
        return {"checked": False, "line": line}
    check_published(Path(run_dir), summary["run_id"], local_log, "report not rendered")
    return {"checked": True, "line": f"quarantine files checked against the COMPLETE record in {storage.display(log_path)}"}


def _suite_infer(args) -> int:
    from pathlib import Path

    from poisonguard.config import load_config
    from poisonguard.infer import infer_suite, write_suite

    from poisonguard import storage
    from poisonguard.run.remote import local_inputs

    config = load_config(args.config, args.overrides)
    stem = Path(storage.display(args.out).rsplit("/", 1)[-1]).stem
    with local_inputs(args.inputs) as (inputs, names):
        suite = infer_suite(inputs, config, name=args.name or stem, strictness=args.strictness, seed=config.seed,
                            names=names)
    write_suite(suite, args.out)
    vectors = len(suite["meta"]["poisonguard"]["vectors"])
    print(f"wrote {storage.display(args.out)}: {len(suite['expectations'])} expectations and {vectors} vector expectations "
          f"({args.strictness}), inferred from {suite['meta']['poisonguard']['inferred_from']}")
    return 0


def _verify(args) -> int:
    from poisonguard.errors import InputError
    from poisonguard.provenance import verify

    from poisonguard import storage
    from poisonguard.run.remote import local_file

    with local_file(args.log, missing_ok=True) as path:  # on object storage a copy, checked whole
        if path is None:
            raise InputError("no such provenance log", path=storage.display(args.log))
        ok, message = verify(path, head=args.head)
    print(f"{storage.display(args.log)}: {'OK' if ok else 'TAMPERED'}: {message}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
