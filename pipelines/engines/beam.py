"""The Beam engine: the screening core inside a two-pass Beam graph, joined by small side inputs.

Pass 1 reads only id, label and embedding; it builds mergeable per-class state (moments and a
bounded sample) and finds duplicate ids by hash bucket.  Pass 2 streams every column again,
validates, scores against the fitted detectors and writes each batch's clean and quarantined rows.
Only ParDo, CombinePerKey, GroupByKey and side inputs are used, so any runner can run it.  Every
DoFn only moves Arrow tables to a ``poisonguard.core.screening.Screener`` and its results on.
"""

from __future__ import annotations

import logging

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.pvalue import AsSingleton

from poisonguard import io as pio
from poisonguard.core.copies import BUCKETS as COPY_BUCKETS, CopyGroups
from poisonguard.core.screening import Fitted, Screener, duplicate_hashes, fit_detectors, fit_report, \
    merge_class_states, merge_stats, split_views
from poisonguard.core.threads import blas_threads, limit_worker
from poisonguard.detectors import merge_states
from poisonguard.engines.outputs import load_error, reporting_errors, save_result, write_block
from poisonguard.engines.progress import Progress
from poisonguard.errors import InputError, one_line
from poisonguard.observe import phase
from poisonguard.io import WorkItem
from poisonguard.state import class_moments

HASH_BUCKETS = 16
DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"  # Beam knows it by its full name only
log = logging.getLogger("poisonguard")


def use_system_allocator() -> None:
    """Arrow's default jemalloc pool keeps freed batches; the system allocator plus malloc_trim
    returns them, which keeps a 1M x 128 scan under 1 GB (measured: 1013 MiB -> 957 MiB)."""
    try:
        pa.set_memory_pool(pa.system_memory_pool())
    except (pa.ArrowException, AttributeError):
        pass


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them per arena otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ReadDataset(beam.PTransform):
    """Work items (runs of row groups) -> (item, first_row, Arrow table) batches."""

    def __init__(self, items: list[WorkItem], columns: list[str] | None, batch_size: int, staging: str):
        super().__init__()
        self.items, self.columns, self.batch_size, self.staging = items, columns, batch_size, staging

    def expand(self, pbegin):
        columns, batch_size, staging = self.columns, self.batch_size, self.staging

        def read(item: WorkItem):
            with reporting_errors(staging):
                for first_row, table in pio.read_batches(item, columns, batch_size):
                    yield item, first_row, table

        return pbegin | "Items" >> beam.Create(self.items) | "Spread" >> beam.Reshuffle() | "Read" >> beam.FlatMap(read)


class _FitPass(beam.DoFn):
    """Per-class states, id hashes and the rows' (content, labelled) hash pairs as ("state", label,
    state), ("ids", bucket, hashes) and ("copies", bucket, pairs) elements, merged across the bundle
    and emitted once per class and bucket.

    Emitting one state per batch would let the runner materialise every batch's sample (a copy of
    the embeddings) before the combine; merging in the bundle bounds what leaves a worker by
    classes x max_fit_rows_per_class, whatever the dataset size.  Beam's DaskRunner drops what
    finish_bundle emits, so there (``per_batch``) each batch's part is emitted as it is made.
    One output of tagged tuples, not tagged outputs, because that runner merges tagged outputs too.
    """

    def __init__(self, screener: Screener, staging: str, per_batch: bool = False):
        self.screener, self.staging, self.per_batch = screener, staging, per_batch

    def setup(self):
        use_system_allocator()
        limit_worker(self.screener.config.blas_threads)
        self.progress = Progress("fit pass", self.screener.plan.total_rows)

    def start_bundle(self):
        self.states: dict = {}
        self.ids: dict[int, list[np.ndarray]] = {}
        self.copies: dict[int, list[np.ndarray]] = {}

    def process(self, element):
        item, first_row, table = element
        with reporting_errors(self.staging):
            part = self.screener.fit_part(self.screener.make_block(table, item.file_index, first_row))
        self.progress.add(table.num_rows)
        merge_class_states(self.states, part.states)
        _add_by_bucket(self.ids, part.id_hashes, part.id_hashes % HASH_BUCKETS)
        _add_by_bucket(self.copies, part.copy_pairs, part.copy_pairs[:, 0] % COPY_BUCKETS)
        if self.per_batch:
            yield from self._drain()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        for element in self._drain():
            yield GlobalWindows.windowed_value(element)

    def _drain(self):
        for label, state in self.states.items():
            yield "state", label, state
        for bucket, parts in self.ids.items():
            yield "ids", bucket, np.concatenate(parts)
        for bucket, parts in self.copies.items():
            yield "copies", bucket, np.concatenate(parts)
        self.states, self.ids, self.copies = {}, {}, {}


def _add_by_bucket(store: dict[int, list[np.ndarray]], rows: np.ndarray, buckets: np.ndarray) -> None:
    """Append each bucket's rows to its list in ``store``."""
    for bucket in np.unique(buckets):
        store.setdefault(int(bucket), []).append(rows[buckets == bucket])


class _MergeStates(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, acc, state):
        return state if acc is None else acc.merge(state)

    def merge_accumulators(self, accumulators):
        return merge_states(a for a in accumulators if a is not None)

    def extract_output(self, acc):
        return acc


class FitDetectors(beam.PTransform):
    """Batches -> (Fitted: detectors, duplicated id hashes and groups of exact copies; per-class
    moments), one element each."""

    def __init__(self, screener: Screener, staging: str, per_batch: bool = False):
        super().__init__()
        self.screener, self.staging, self.per_batch = screener, staging, per_batch

    def expand(self, batches):
        config = self.screener.config
        parts = batches | "Moments" >> beam.ParDo(_FitPass(self.screener, self.staging, self.per_batch))
        states = (
            parts
            | "States" >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == "state" else [])
            | "MergePerClass" >> beam.CombinePerKey(_MergeStates())
            | "AllClasses" >> beam.combiners.ToList()
        )
        staging, confirmed = self.staging, self.screener.plan.confirmed_groups

        def fit(pairs):
            limit_worker(config.blas_threads)
            with reporting_errors(staging):
                return (fit_detectors(dict(pairs), config, confirmed),
                        {c: s.n for c, s in split_views(dict(pairs))[0].items()})

        detectors = states | "Fit" >> beam.Map(fit)
        moments = states | "ClassMoments" >> beam.Map(lambda pairs: class_moments(split_views(dict(pairs))[0]))
        dups = (
            parts
            | "Ids" >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == "ids" else [])
            | "ByBucket" >> beam.GroupByKey()
            | "DupsInBucket" >> beam.Map(lambda kv: duplicate_hashes(np.concatenate(list(kv[1]))))
            | "AllDups" >> beam.combiners.ToList()
            | "Concat" >> beam.Map(lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64))
        )
        copies = (
            parts
            | "CopyPairs" >> beam.FlatMap(lambda e: [(e[1], e[2])] if e[0] == "copies" else [])
            | "CopiesByBucket" >> beam.GroupByKey()
            | "CopiesInBucket" >> beam.Map(lambda kv: CopyGroups.of_pairs(np.concatenate(list(kv[1]))))
            | "AllCopies" >> beam.combiners.ToList()
            | "UnionCopies" >> beam.Map(CopyGroups.union)
        )
        fitted = detectors | "WithDups" >> beam.Map(lambda fit, dups, copies: Fitted(fit[0], dups, fit[1], copies),
                                                     AsSingleton(dups), AsSingleton(copies))
        return fitted, moments


class _Validate(beam.DoFn):
    def __init__(self, screener: Screener, staging: str):
        self.screener, self.staging = screener, staging

    def setup(self):
        limit_worker(self.screener.config.blas_threads)

    def process(self, element, fitted_barrier=None):
        item, first_row, table = element
        with reporting_errors(self.staging):
            block = self.screener.make_block(table, item.file_index, first_row, stage="score")
            warnings = self.screener.validate(table, block)
        yield item, table, block, warnings


class ValidateRows(beam.PTransform):
    """Batches -> (item, table, RowBlock with built-in, suite and review reasons, batch warnings).

    The Embed step runs inside it, on the same batch: in model and proxy mode it reads the embeddings
    the fit pass kept, so it waits for the fitted detectors (a side input) before it starts.
    """

    def __init__(self, screener: Screener, staging: str, fitted=None):
        super().__init__()
        self.screener, self.staging, self.fitted = screener, staging, fitted

    def expand(self, batches):
        barrier = [AsSingleton(self.fitted)] if self.fitted is not None and self.screener.spill_dir else []
        return batches | "Validate" >> beam.ParDo(_Validate(self.screener, self.staging), *barrier)


class ScoreRows(beam.PTransform):
    """Adds every detector's scores and flags (and duplicate-id reasons) to each validated batch."""

    def __init__(self, screener: Screener, fitted):
        super().__init__()
        self.screener, self.fitted = screener, fitted

    def expand(self, validated):
        screener = self.screener

        def score(element, fitted):
            limit_worker(screener.config.blas_threads)
            item, table, block, warnings = element
            return item, table, block, warnings, screener.score(block, fitted), screener.report_bounds(fitted)

        return validated | "Score" >> beam.Map(score, AsSingleton(self.fitted))


class _WriteParts(beam.DoFn):
    def __init__(self, screener: Screener, staging: str, run_id: str):
        self.screener, self.staging, self.run_id = screener, staging, run_id

    def setup(self):
        use_system_allocator()
        limit_worker(self.screener.config.blas_threads)
        self.progress = Progress("score pass", self.screener.plan.total_rows)

    def process(self, element):
        item, table, block, warnings, scores, bounds = element
        with reporting_errors(self.staging):
            clean, held, stats = self.screener.split(table, block, scores, self.run_id, warnings)
            write_block(self.staging, item.file_index, block.first_row, clean, held,
                        self.screener.report_candidates(clean, bounds))
        self.progress.add(len(block))
        _release_freed_memory()
        yield stats


class _MergeStats(beam.CombineFn):
    def create_accumulator(self):
        return {}

    def add_input(self, acc, stats):
        return merge_stats(acc, stats)

    def merge_accumulators(self, accumulators):
        out: dict = {}
        for acc in accumulators:
            out = merge_stats(out, acc)
        return out

    def extract_output(self, acc):
        return acc


class WriteOutputs(beam.PTransform):
    """Writes clean/ and quarantine/ part files into the staging folder; returns merged counts."""

    def __init__(self, screener: Screener, staging: str, run_id: str):
        super().__init__()
        self.screener, self.staging, self.run_id = screener, staging, run_id

    def expand(self, scored):
        return (
            scored
            | "WriteParts" >> beam.ParDo(_WriteParts(self.screener, self.staging, self.run_id))
            | "Counts" >> beam.CombineGlobally(_MergeStats())
        )


def build_scan(pipeline: beam.Pipeline, screener: Screener, staging: str, run_id: str, rows_per_item: int,
               per_batch: bool = False) -> None:
    """ReadDataset -> ValidateRows (Embed inside) -> FitDetectors -> ScoreRows -> WriteOutputs."""
    config, cols = screener.config, screener.config.columns
    items = pio.work_items(screener.plan, rows_per_item)

    fit_columns = [cols.id, cols.label, config.vector_column]
    fit_input = pipeline | "ReadForFit" >> ReadDataset(items, fit_columns, config.batch_size, staging)
    fitted, moments = fit_input | "FitDetectors" >> FitDetectors(screener, staging, per_batch)
    counts = (
        pipeline
        | "ReadDataset" >> ReadDataset(items, None, config.batch_size, staging)
        | "ValidateRows" >> ValidateRows(screener, staging, fitted)
        | "ScoreRows" >> ScoreRows(screener, fitted)
        | "WriteOutputs" >> WriteOutputs(screener, staging, run_id)
    )
    # one sink that depends on everything: runners that compute only the graph's last collection
    # (Beam's DaskRunner) then still run every branch
    (
        (counts | "TagCounts" >> beam.Map(lambda c: ("counts", c)),
         fitted | "TagFit" >> beam.Map(lambda f: ("fit", fit_report(f.detectors))),
         fitted | "TagCopies" >> beam.Map(lambda f: ("copies", f.copies.report())),
         moments | "TagMoments" >> beam.Map(lambda m: ("moments", m)))
        | "AllResults" >> beam.Flatten()
        | "SaveResults" >> beam.MapTuple(lambda key, value: save_result(staging, key, value))
    )


def run(screener: Screener, staging: str, run_id: str, beam_args: list[str], rows_per_item: int) -> None:
    from apache_beam.options.pipeline_options import PipelineOptions

    use_system_allocator()
    beam_args = [{"DaskRunner": DASK_RUNNER, "--runner=DaskRunner": f"--runner={DASK_RUNNER}"}.get(a, a)
                 for a in beam_args]
    options = PipelineOptions(beam_args)
    try:
        pipeline = beam.Pipeline(options=options)
    except ValueError as exc:  # an unknown --runner, say
        raise InputError(f"Beam options: {one_line(exc)[:300]}") from None
    log.info("pipeline: runner %s, detectors %s", options.get_all_options().get("runner") or "DirectRunner",
             ", ".join(screener.detector_names))
    try:
        with phase("fit and score (one Beam graph: both passes)"), blas_threads(screener.config.blas_threads), \
                pipeline:
            build_scan(pipeline, screener, staging, run_id, rows_per_item, per_batch=DASK_RUNNER in beam_args
                       or f"--runner={DASK_RUNNER}" in beam_args)
    except Exception:
        error = load_error(staging)
        if error is None:
            raise
        raise error from None
