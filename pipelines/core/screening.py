"""The screening core: one block of rows in, clean and quarantined rows and block statistics out.

Beam-free and engine-agnostic.  Both engines (``poisonguard.engines.memory`` and
``poisonguard.engines.beam``) only move Arrow tables to a ``Screener`` and its results back:

* pass 1, per block: built-in checks and embedding (``make_block``), then the mergeable per-class
  state, the id hashes and the rows' content hashes (``fit_part``, ``core.copies``), merged with
  ``merge_class_states`` and fitted by ``fit_detectors``;
* pass 2, per block: built-in checks, the suite and review decisions (``validate``), every
  detector's scores and flags (``score``), the split into output tables and statistics (``split``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from poisonguard.config import Config
from poisonguard.core.block import RowBlock, builtin_block
from poisonguard.core.copies import CopyGroups, content_hashes, labelled_hashes
from poisonguard.detectors import ClassState, PoisonDetector, make_detector
from poisonguard.detectors.base import label_codes
from poisonguard.detectors.stats import states_of_block
from poisonguard.detectors.calibration import MIN_CLASS_ROWS
from poisonguard.io import InputPlan
from poisonguard.names import DECISION_STATUS, ID_DUPLICATE, ID_MISSING, LABEL_MISSING, QUARANTINE_REASONS, REVIEW_CONFIRMED, \
    REVIEW_STATUS, RUN_ID, detector_reason, reason_rank, score_column, spill_name


@dataclass
class FitPart:
    """What pass 1 takes from one block: per-class states, the hashes of its non-null ids, and the
    (content, labelled) hash pair of each scorable row (``core.copies``)."""

    states: list[tuple[object, ClassState]]
    id_hashes: np.ndarray
    copy_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.uint64))


@dataclass
class Fitted:
    """Pass 1's result, the side input of pass 2: fitted detectors, duplicated id hashes and the
    groups of exact copies."""

    detectors: dict[str, PoisonDetector]
    duplicate_ids: np.ndarray
    class_rows: dict = field(default_factory=dict)  # rows per class (the report sample's key bounds)
    copies: CopyGroups = field(default_factory=CopyGroups)


class Screener:
    """The per-block screening steps, set up once per worker (the model and GX load lazily)."""

    def __init__(self, config: Config, plan: InputPlan, suite: dict | None = None, decisions: dict | None = None,
                 spill_dir: str | None = None, report_sample: bool = False):
        self.config, self.plan, self.suite, self.decisions = config, plan, suite, decisions or {}
        self.spill_dir = spill_dir  # model/proxy mode: pass 1 keeps its embeddings here, pass 2 reads them
        self.report_sample = report_sample  # keep the report's clean-sample candidates (core.report_sample)
        self._embedder = self._runner = self._scorer = self._bounds = None
        self._ready = False
        from poisonguard.core.torch_scoring import resolve_device

        self.scoring_device = resolve_device(config.scoring_device)  # a missing GPU fails here, before pass 1

    def setup(self) -> None:
        if self._ready:
            return
        from poisonguard.core.embedding import make_embedder

        self._embedder = make_embedder(self.plan, self.config)
        if self.suite:
            from poisonguard.core.suite import SuiteRunner

            self._runner = SuiteRunner(self.suite, self.config.suite or "suite")
        self._ready = True

    @property
    def detector_names(self) -> list[str]:
        return [d.name for d in self.config.detectors]

    def make_block(self, table: pa.Table, file_index: int, first_row: int, stage: str = "fit") -> RowBlock:
        """Built-in checks and embeddings of one batch (``stage``: "fit" for pass 1, "score" for pass 2)."""
        self.setup()
        config, cols = self.config, self.config.columns
        embeddings = bad = None
        model_rows = 0
        if self._embedder is not None:
            embeddings, bad = self._spilled(file_index, first_row, table.num_rows) if stage == "score" else (None, None)
            if embeddings is None:
                embeddings, bad = self._embedder(table.column(config.embedding.features))
                model_rows = table.num_rows
                if stage == "fit" and self.spill_dir:
                    self._spill(file_index, first_row, embeddings, bad)
        block = builtin_block(table, file_index=file_index, first_row=first_row, id_col=cols.id,
                              label_col=cols.label, emb_col=cols.embedding, dim=self.plan.dim,
                              max_abs=config.embedding.max_abs_value, seed=config.seed,
                              embeddings=embeddings, bad_features=bad)
        block.model_rows = model_rows
        if self.plan.label_view == "features":
            from poisonguard.embed import features_to_numpy

            block.features = features_to_numpy(table.column(config.embedding.features), self.plan.n_features)[0]
        return block

    def _spill_path(self, file_index: int, first_row: int) -> str:
        import os

        return os.path.join(self.spill_dir, spill_name(file_index, first_row))

    def _spill(self, file_index: int, first_row: int, embeddings, bad) -> None:
        import os

        import pyarrow.feather as feather

        os.makedirs(self.spill_dir, exist_ok=True)
        path = self._spill_path(file_index, first_row)
        feather.write_feather(pa.table({"embedding": embeddings, "bad": pa.array(bad)}), path + ".tmp",
                              compression="uncompressed")
        os.replace(path + ".tmp", path)

    def _spilled(self, file_index: int, first_row: int, rows: int):
        """The embeddings pass 1 computed for this batch, or (None, None) where there are none."""
        import os

        import pyarrow.feather as feather

        if not self.spill_dir or not os.path.exists(self._spill_path(file_index, first_row)):
            return None, None
        kept = feather.read_table(self._spill_path(file_index, first_row), memory_map=False)
        if kept.num_rows != rows:
            return None, None
        return kept.column("embedding").combine_chunks(), kept.column("bad").to_numpy(zero_copy_only=False)

    # ---- pass 1 ------------------------------------------------------------------------------
    def fit_part(self, block: RowBlock) -> FitPart:
        ok = block.scorable
        content = content_hashes(block.x[ok])
        return FitPart(class_states(block, self.config.max_fit_rows_per_class),
                       block.id_hash[~block.mask(ID_MISSING)],
                       np.column_stack([content, labelled_hashes(content, block.labels[ok])]))

    # ---- pass 2 ------------------------------------------------------------------------------
    def validate(self, table: pa.Table, block: RowBlock) -> list[str]:
        """Adds the suite's row-level reasons and reviewers' decisions; returns batch-level warnings."""
        self.setup()
        warnings: list[str] = []
        if self._runner is not None:
            masks, warnings = self._runner.failures(table)
            for reason, mask in masks.items():
                block.add_reason(reason, mask)
        if self.decisions:
            from poisonguard.core.decisions import apply_decisions

            apply_decisions(block, table, self.decisions, self.plan.schema.names)
        return warnings

    def score(self, block: RowBlock, fitted: Fitted) -> dict[str, np.ndarray]:
        mark_copies(block, fitted.copies)
        return score_block(block, fitted.detectors, fitted.duplicate_ids, self.scorer)

    @property
    def scorer(self):
        """The torch scorer where ``scoring_device`` resolved to a device (``core.torch_scoring``), else None."""
        if self._scorer is None and self.scoring_device:
            from poisonguard.core.torch_scoring import TorchScorer

            self._scorer = TorchScorer(self.scoring_device)
        return self._scorer

    def report_bounds(self, fitted: Fitted) -> dict | None:
        """Per flagged class, the key bound of the report's clean-sample candidates; None where this
        screener keeps none."""
        if not self.report_sample:
            return None
        cached = self._bounds
        if cached is not None and cached[0] is fitted:  # (Beam: once per worker, not once per batch)
            return cached[1]
        from poisonguard.core import report_sample

        report = self.config.report
        bounds = report_sample.plan({n: d.decisions_ for n, d in fitted.detectors.items()}, fitted.class_rows,
                                    report.max_points_per_class, report.max_classes)
        self._bounds = (fitted, bounds)
        return bounds

    def report_candidates(self, clean: pa.Table, bounds: dict | None) -> pa.Table | None:
        from poisonguard.core import report_sample

        cols = self.config.columns
        return report_sample.candidates(clean, bounds, cols.label, cols.id, self.config.seed)

    def split(self, table: pa.Table, block: RowBlock, scores: dict[str, np.ndarray], run_id: str,
              warnings: list[str]) -> tuple[pa.Table, pa.Table, dict]:
        clean, held = split_tables(table, block, scores, self.detector_names, run_id)
        return clean, held, block_stats(block, warnings)


def class_states(block: RowBlock, capacity: int) -> list[tuple[object, ClassState]]:
    """Per-class mergeable state of one batch's scorable rows (all classes in one sort); where the block
    carries the feature column for confident learning, its states too, keyed (FEATURE_VIEW, label)."""
    ok = np.flatnonzero(block.scorable)
    if not len(ok):
        return []
    labels, codes = label_codes(block.labels[ok])
    every = len(ok) == len(block)
    x, keys = (block.x, block.sample_keys) if every else (block.x[ok], block.sample_keys[ok])
    out = list(zip(labels, states_of_block(x, codes, len(labels), keys, capacity)))
    if block.features is not None:
        features = block.features if every else block.features[ok]
        out += [((FEATURE_VIEW, label), state)
                for label, state in zip(labels, states_of_block(features, codes, len(labels), keys, capacity))]
    return out


FEATURE_VIEW = "features-view"  # key of a class's state of the feature column: (FEATURE_VIEW, label)
FEATURE_VIEW_DETECTORS = ("confident_label",)  # what reads the feature column where label_view is features


JOINT_VIEW_DETECTORS = ("knn_label",)  # ... and what reads the embedding followed by the feature column


def view_rows(name: str, x: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """The rows detector ``name`` reads: the feature column for the label checks of the feature view
    (``features`` given), the embedding and the feature column side by side for the k-NN label
    check (``detectors.feature_votes``), else the embedding."""
    if features is None:
        return x
    if name in FEATURE_VIEW_DETECTORS:
        return features
    if name in JOINT_VIEW_DETECTORS:
        return np.hstack([np.asarray(x, dtype=np.float32), np.asarray(features, dtype=np.float32)])
    return x


def split_views(states: dict) -> tuple[dict, dict]:
    """(the embedding's class states, the feature column's by label: empty unless label_view is features)."""
    featured = {key for key in states if isinstance(key, tuple) and key[:1] == (FEATURE_VIEW,)}
    if not featured:
        return states, {}
    return ({k: s for k, s in states.items() if k not in featured},
            {k[1]: s for k, s in states.items() if k in featured})


def merge_class_states(into: dict[object, ClassState], states) -> dict[object, ClassState]:
    """Merge (label, state) pairs into ``into`` (the order of merging does not change the result)."""
    for label, state in states:
        into[label] = state if label not in into else into[label].merge(state)
    return into


def fit_detectors(states: dict[object, ClassState], config: Config, confirmed: tuple = ()) -> dict[str, PoisonDetector]:
    """Every configured detector fitted on the class states; with feature-column states
    (``split_views``), confident learning is fitted on those, with a probe of its own, and the
    other detectors ask them whether a separated group is another class's rows
    (``detectors.lookalike``).  ``confirmed``: the groups proxy mode's exclusionary
    reclassification confirmed (``poisonguard.core.exclusion``; ``InputPlan.confirmed_groups``)."""
    states, features = split_views(states)
    if len(states) > config.max_classes:
        from poisonguard.errors import InputError

        raise InputError(f"the data has {len(states)} classes, more than max_classes={config.max_classes}",
                         column=config.columns.label)
    detectors = {det.name: make_detector(det.name, **config.detector_params(det)) for det in config.detectors}
    on_features = {name for name in detectors if features and name in FEATURE_VIEW_DETECTORS}
    ordered_features = dict(sorted(features.items(), key=lambda kv: (str(type(kv[0])), kv[0]))) if features else None
    extra = lambda name: {"features": ordered_features} if ordered_features and name not in on_features else {}
    fitted = {}
    for view, names in ((states, set(detectors) - on_features), (features, on_features)):
        ordered = dict(sorted(view.items(), key=lambda kv: (str(type(kv[0])), kv[0])))
        users = {name: detectors[name] for name in detectors if name in names}
        probe = shared_probe(ordered, users) if users else None
        fitted.update({name: detector.fit_states(ordered, probe=probe, **extra(name)) if name in PROBE_USERS
                       else detector.fit_states(ordered, **extra(name)) for name, detector in users.items()})
    if confirmed:
        from poisonguard.core.exclusion import apply_confirmed

        apply_confirmed(fitted, confirmed)
    return {name: fitted[name] for name in detectors}


PROBE_USERS = ("confident_label", "knn_label")


def shared_probe(states: dict[object, ClassState], detectors: dict[str, PoisonDetector]):
    """The label checks' linear probe (``detectors.probe``), fitted once for both, with confident
    learning's parameters where it runs; None where no label check runs or the probe cannot."""
    from poisonguard.detectors.probe import fit_probe

    if "confident_label" not in detectors and getattr(detectors.get("knn_label"), "weak_min_disagreement", None) is None:
        return None  # no label check that reads it
    if "confident_label" in detectors:
        return fit_probe(states, **detectors["confident_label"].probe_params())
    return fit_probe(states, random_state=detectors["knn_label"].random_state)


def mark_copies(block: RowBlock, copies: CopyGroups) -> None:
    """Which scorable rows of the block are exact copies of another row (pass 1's groups), and which
    of those copies disagree on the label: counted by ``block_stats``, not a reason."""
    ok = np.flatnonzero(block.scorable)
    copied, conflicting = np.zeros(len(block), bool), np.zeros(len(block), bool)
    if len(copies.hashes) and len(ok):
        copied[ok], conflicting[ok] = copies.marks(content_hashes(block.x[ok]))
    block.copies = (copied, conflicting)


def duplicate_hashes(hashes: np.ndarray) -> np.ndarray:
    values, counts = np.unique(hashes, return_counts=True)
    return values[counts > 1]


def score_block(block: RowBlock, fitted: dict[str, PoisonDetector], dup_hashes: np.ndarray,
                scorer=None) -> dict[str, np.ndarray]:
    """Score every scorable row with each detector; add duplicate-id and detector reasons.
    ``scorer``: a ``core.torch_scoring.TorchScorer`` that does the per-row arithmetic on a device."""
    scores: dict[str, np.ndarray] = {}
    ok = np.flatnonzero(block.scorable)
    if len(dup_hashes):
        block.add_reason(ID_DUPLICATE, np.isin(block.id_hash, dup_hashes) & ~block.mask(ID_MISSING))
    x, y, keys = block.x[ok], block.labels[ok], block.sample_keys[ok]
    features = block.features[ok] if block.features is not None else None
    for name, detector in fitted.items():
        column = np.full(len(block), np.nan)
        flags = np.zeros(len(block), dtype=bool)
        rows = view_rows(name, x, features)
        if len(ok):
            if scorer is not None:
                column[ok], flags[ok] = scorer.score_and_flag(detector, rows, y, keys)
            else:
                column[ok], flags[ok] = detector.score_and_flag(rows, y, keys)
        scores[name] = column
        if block.released is not None:
            flags &= ~block.released
        block.add_reason(detector_reason(name), flags)
    return scores


def row_reasons(block: RowBlock, rows: np.ndarray) -> list[list[str]]:
    """The ordered reason list of each selected row (a boolean mask over the block)."""
    names = sorted(block.reasons, key=reason_rank)
    if not names:
        return [[] for _ in range(int(rows.sum()))]
    matrix = np.column_stack([block.reasons[r] for r in names])[rows]
    return [[names[j] for j in np.flatnonzero(row)] for row in matrix]


def split_tables(table: pa.Table, block: RowBlock, scores: dict[str, np.ndarray], detector_names: list[str],
                 run_id: str) -> tuple[pa.Table, pa.Table]:
    """Every input column unchanged, plus score_<detector>; quarantine adds reasons and run_id."""
    for name in detector_names:
        table = table.append_column(pa.field(score_column(name), pa.float64()), pa.array(scores[name], pa.float64()))
    status = np.full(len(block), None, dtype=object)
    if block.released is not None:
        status[block.released] = DECISION_STATUS["release"]
    status[block.mask(REVIEW_CONFIRMED)] = DECISION_STATUS["confirm"]
    table = table.append_column(pa.field(REVIEW_STATUS, pa.string()), pa.array(status, pa.string()))
    quarantined = block.quarantined
    clean = table.filter(pa.array(~quarantined))
    held = table.filter(pa.array(quarantined))
    reasons = row_reasons(block, quarantined)
    held = held.append_column(pa.field(QUARANTINE_REASONS, pa.list_(pa.string())),
                              pa.array(reasons, pa.list_(pa.string())))
    held = held.append_column(pa.field(RUN_ID, pa.string()), pa.array([run_id] * held.num_rows, pa.string()))
    return clean, held


def output_schemas(schema: pa.Schema, detector_names: list[str]) -> tuple[pa.Schema, pa.Schema]:
    clean = schema
    for name in detector_names:
        clean = clean.append(pa.field(score_column(name), pa.float64()))
    clean = clean.append(pa.field(REVIEW_STATUS, pa.string()))
    held = clean.append(pa.field(QUARANTINE_REASONS, pa.list_(pa.string()))).append(pa.field(RUN_ID, pa.string()))
    return clean, held


def block_stats(block: RowBlock, warnings: list[str] | None = None) -> dict:
    quarantined = block.quarantined
    labelled = ~block.mask(LABEL_MISSING)  # rows without a label are counted under their reason only
    classes: dict[str, dict[str, int]] = {}
    for label, n_in, n_q in _count_by(block.labels[labelled].astype(str), quarantined[labelled]):
        classes[label] = {"rows": n_in, "clean": n_in - n_q, "quarantined": n_q}
    return {
        "rows": len(block),
        "clean": int((~quarantined).sum()),
        "quarantined": int(quarantined.sum()),
        "reasons": {reason: int(mask.sum()) for reason, mask in block.reasons.items() if mask.any()},
        "classes": classes,
        "batch_warnings": dict(Counter(warnings or [])),
        "model_rows_in_score_pass": block.model_rows,
        **_copy_stats(block, quarantined),
        "review": {
            "released": int(0 if block.released is None else (block.released & ~quarantined).sum()),
            "confirmed": int(block.mask(REVIEW_CONFIRMED).sum()),
        },
    }


def _copy_stats(block: RowBlock, quarantined: np.ndarray) -> dict:
    if block.copies is None:
        return {}
    copied, conflicting = block.copies
    return {"copies": {"rows": int(copied.sum()), "quarantined": int((copied & quarantined).sum()),
                       "conflicting_label_quarantined": int((conflicting & quarantined).sum())}}


def _count_by(labels: np.ndarray, quarantined: np.ndarray):
    uniques, inverse = np.unique(labels, return_inverse=True)
    rows = np.bincount(inverse, minlength=len(uniques))
    held = np.bincount(inverse, weights=quarantined, minlength=len(uniques)).astype(int)
    for label, n_in, n_q in zip(uniques.tolist(), rows.tolist(), held.tolist()):
        yield label, n_in, n_q


def merge_stats(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if isinstance(value, dict):
            out[key] = merge_stats(out.get(key, {}), value)
        else:
            out[key] = out.get(key, 0) + value
    return out


def fit_report(fitted: dict[str, PoisonDetector]) -> dict:
    """Per detector: parameters and, per class that is suspicious or had enough rows to test, the
    statistic, decision, threshold and extras; smaller classes are counted by reason, not listed."""
    report = {}
    for name, detector in fitted.items():
        classes, untested = {}, Counter()
        models = getattr(detector, "class_models_", {})
        for label, decision in detector.decisions_.items():
            if not decision.suspicious and decision.rows_tested < MIN_CLASS_ROWS:
                untested[decision.why] += 1
                continue
            entry = decision.to_dict()
            model = models.get(label)
            if isinstance(model, dict):
                entry.update({k: float(v) for k, v in model.items() if np.isscalar(v) and not isinstance(v, str)})
            classes[str(label)] = entry
        report[name] = {"params": _jsonable(detector.get_params()), "classes": classes,
                        "untested_classes": dict(untested),
                        "mass_quarantine": getattr(detector, "mass_quarantine_", None),
                        "representation": getattr(detector, "representation_", None)}
    return report


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
