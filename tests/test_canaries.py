"""The canary self-test: deterministic, never changes what is published, can fail the run on low recall."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import POISONED, ROOT, embedding_array, gaussian_table, read_outputs, run_cli, \
    snapshot, write

PROXY = ROOT / "configs" / "digits_proxy.yaml"


def _published(run_dir) -> dict[str, bytes]:
    return {k: v for k, v in snapshot(run_dir).items() if k.startswith(("clean/", "quarantine/")) or k == "review.csv"}


def test_proxy_canaries_are_deterministic_and_change_no_published_row(tmp):
    runs = {}
    # half the sample and a short training: the same code path, and what is asserted (determinism, not a
    # published byte changed, the canaries' bookkeeping) holds whatever the proxy learnt; without the
    # exclusion check's second training (tests/test_exclusion.py: its determinism on both engines)
    half = write(pq.read_table(POISONED).slice(0, 900), tmp / "half.parquet")
    for name, extra in (("plain", []), ("canaries", ["--canaries"]), ("again", ["--canaries"])):
        code, stdout, stderr = run_cli("scan", half, "--out", tmp / name, "--config", PROXY, "--quiet",
                                       "--run-id", "same", "--set", "embedding.proxy_epochs=8",
                                       "--set", "embedding.proxy_exclusion=false",
                                       "--set", "canaries.max_classes=3", *extra)
        assert code == 0, stderr
        runs[name] = json.loads((tmp / name / "summary.json").read_text())
    assert _published(tmp / "plain") == _published(tmp / "canaries") == _published(tmp / "again")
    clean, held = read_outputs(tmp / "canaries")
    ids = clean.column("id").to_pylist() + held.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 900 and not any(i.startswith("__poisonguard_canary__") for i in ids)
    first, second = runs["canaries"]["canaries"], runs["again"]["canaries"]
    assert first == second and runs["plain"]["canaries"] is None
    assert first["mode"] == "proxy" and len(first["per_class"]) == 3  # the three largest classes, by config
    assert first["proxies"] == 1  # one proxy learns every target's canaries by default
    assert first["planted"] == sum(c["canaries"] for c in first["per_class"].values()) >= 3 * 3  # at least 3 a class
    assert 0 <= first["caught"] <= first["planted"]
    assert all(c["finding"].endswith(f"canaries found in class {k}") for k, c in first["per_class"].items())
    assert "Canary self-test" in (tmp / "canaries" / "report.html").read_text()


def _separable(tmp):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1500, 8)).astype(np.float32) + np.repeat(np.arange(5), 300)[:, None] * 10
    return write(pa.table({"id": [f"r{i}" for i in range(1500)], "label": np.repeat(np.arange(5), 300),
                           "embedding": embedding_array(x)}), tmp / "sep.parquet")


def test_embedding_power_analysis_reports_the_smallest_cluster_caught(tmp):
    data = _separable(tmp)
    settings = ["--set", "canaries.sizes=[0.005, 0.05]", "--set", "canaries.max_classes=2",
                "--set", "detectors=[{name: spectral}, {name: spectre}]"]
    code, stdout, stderr = run_cli("scan", data, "--out", tmp / "run", "--canaries", *settings,
                                   "--set", "canaries.distances=[12, 0.05]")
    assert code == 0, stderr
    canaries = json.loads((tmp / "run" / "summary.json").read_text())["canaries"]
    assert canaries["mode"] == "embedding" and len(canaries["per_class"]) == 2
    for label, c in canaries["per_class"].items():
        assert [(t["distance_sd"], t["rows"]) for t in c["trials"]] == [(0.05, 3), (0.05, 15), (12.0, 3), (12.0, 15)]
        near, far = c["smallest_caught_rows"]["0.05"], c["smallest_caught_rows"]["12.0"]
        assert near is None and far in (3, 15)  # a group inside its class is no attack to find; 12 SDs out is
        assert c["finding"].startswith(f"class {label}: a backdoor of >= {far} rows at >= 12.0 SDs would have been caught")
        assert c["finding"].endswith("(none at 0.05 SDs, up to 15 rows)")
    assert "canaries (embedding mode)" in stdout
    code, stdout, _ = run_cli("scan", data, "--out", tmp / "strict", "--canaries", *settings,
                              "--set", "canaries.min_recall=1.0", "--set", "canaries.sizes=[0.005]",
                              "--set", "canaries.distances=[0.05]")
    summary = json.loads((tmp / "strict" / "summary.json").read_text())
    assert code == 1 and summary["verdict"] == "canary_recall_below_min" and not summary["canaries"]["passed"]
    assert "canary recall below canaries.min_recall" in stdout


def test_a_power_finding_says_when_its_class_holds_rows_the_scan_quarantined(tmp):
    """Planted groups sit among every row of their class; beside a backdoor already found they can be
    caught with it, so the finding says the class holds quarantined rows (and how many)."""
    code, stdout, stderr = run_cli("scan", POISONED, "--out", tmp / "run", "--config", ROOT / "configs" / "digits.yaml",
                                   "--canaries", "--set", "canaries.max_classes=2", "--set", "canaries.sizes=[0.05]",
                                   "--set", "canaries.distances=[8.0]")
    assert code == 0, stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    cells = summary["canaries"]["per_class"]
    assert len(cells) == 2 and any(c["quarantined_in_class"] for c in cells.values())
    for label, cell in cells.items():
        held = summary["per_class"][label]["quarantined"]
        assert cell["quarantined_in_class"] == held
        assert cell["finding"].endswith(f"class {label} holds {held} rows this scan quarantined, and a group planted "
                                        "beside rows already found can be caught with them") == (held > 0)
        assert cell["finding"] in stdout and html.escape(cell["finding"]) in (tmp / "run" / "report.html").read_text()


def test_classes_too_small_to_plant_in_report_no_recall_and_fail_a_required_minimum(tmp):
    """Every class under the rows a planted group needs: nothing is planted, so there is no recall to
    report (null in summary.json, the reason in the console and the report; a NaN here once made
    the summary unwritable, exit 3), and a required minimum recall is not met by nothing."""
    table = gaussian_table(12, 6, 4)
    data = write(table, tmp / "small.parquet")
    code, stdout, stderr = run_cli("scan", data, "--out", tmp / "run", "--canaries")
    assert code == 0, stderr
    canaries = json.loads((tmp / "run" / "summary.json").read_text())["canaries"]
    assert canaries["planted"] == 0 and canaries["recall"] is None and canaries["passed"]
    assert canaries["why"].startswith("nothing planted") and canaries["why"] in stdout
    assert "No recall measured: nothing planted" in (tmp / "run" / "report.html").read_text()
    code, stdout, stderr = run_cli("scan", data, "--out", tmp / "strict", "--canaries", "--set", "canaries.min_recall=0.5",
                                   "--quiet")
    summary = json.loads((tmp / "strict" / "summary.json").read_text())
    assert code == 1 and summary["verdict"] == "canary_recall_below_min" and not summary["canaries"]["passed"]
    assert "canaries.min_recall 0.5 not met: nothing planted" in stdout + stderr


def test_input_rows_may_not_use_the_canary_id_prefix(tmp):
    table = gaussian_table(30, 2, 3)
    table = table.set_column(0, "id", pa.array(["__poisonguard_canary__:1"] + table.column("id").to_pylist()[1:]))
    code, _, _ = run_cli("scan", write(table, tmp / "t.parquet"), "--out", tmp / "run", "--quiet")
    assert code == 0
    held = read_outputs(tmp / "run")[1]
    reasons = dict(zip(held.column("id").to_pylist(), held.column("quarantine_reasons").to_pylist()))
    assert "validation:builtin:id_reserved" in reasons["__poisonguard_canary__:1"]


def test_the_power_analysis_reports_progress_with_its_total(monkeypatch, caplog):
    """It refits every detector per planted group (minutes on large classes): a scheduler's log shows
    how far it is, of how many."""
    import logging

    from poisonguard import canaries
    from poisonguard.config import Config
    from poisonguard.detectors.stats import ClassState

    rng = np.random.default_rng(0)
    states = {c: ClassState.from_block((rng.normal(size=(200, 4)) + 8 * c).astype(np.float32),
                                       rng.integers(0, 2**63, size=200).astype(np.uint64), 5000) for c in range(3)}
    config = Config.model_validate({"canaries": {"sizes": [0.05], "distances": [8.0, 2.0], "max_classes": 2},
                                    "detectors": [{"name": "spectral"}]})
    monkeypatch.setattr(canaries, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="poisonguard"):
        result = canaries.power_of(states, config)
    assert len(result["per_class"]) == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("canaries: ")]
    assert [line.split(",")[0] for line in lines] == [f"canaries: {k} of 4 planted groups" for k in (1, 2, 3, 4)]


def test_the_power_analysis_gives_the_same_findings_in_worker_processes():
    from poisonguard import canaries
    from poisonguard.config import Config
    from poisonguard.detectors.stats import ClassState

    rng = np.random.default_rng(1)
    states = {c: ClassState.from_block((rng.normal(size=(300, 6)) + 6 * c).astype(np.float32),
                                       rng.integers(0, 2**63, size=300).astype(np.uint64), 5000) for c in range(3)}
    settings = {"sizes": [0.02, 0.1], "distances": [8.0, 2.0], "max_classes": 2}
    one, two = (canaries.power_of(states, Config.model_validate({"canaries": {**settings, "workers": workers}}))
                for workers in (1, 2))
    assert one == two and one["planted"] == 2 * (6 + 30) * 2 and one["caught"] > 0


def test_a_daemon_process_runs_the_power_analysis_itself(monkeypatch, caplog):
    """A daemonic process (a multiprocessing pool's worker) may not start processes: the power
    analysis runs in it, says so, and finds the same."""
    import logging
    import multiprocessing
    import types

    from poisonguard import canaries
    from poisonguard.config import Config
    from poisonguard.detectors.stats import ClassState

    rng = np.random.default_rng(2)
    states = {c: ClassState.from_block((rng.normal(size=(120, 3)) + 6 * c).astype(np.float32),
                                       rng.integers(0, 2**63, size=120).astype(np.uint64), 5000) for c in range(2)}
    settings = {"sizes": [0.05], "distances": [8.0], "max_classes": 1}
    alone = canaries.power_of(states, Config.model_validate({"canaries": settings}))
    monkeypatch.setattr(multiprocessing, "current_process", lambda: types.SimpleNamespace(daemon=True, name="pool-worker"))
    with caplog.at_level(logging.WARNING, logger="poisonguard"):
        found = canaries.power_of(states, Config.model_validate({"canaries": {**settings, "workers": 4}}))
    assert found == alone and "may not start processes" in caplog.text


def test_an_interrupted_power_analysis_leaves_no_worker_process_behind(monkeypatch):
    """Ctrl-C or SIGTERM (the CLI raises KeyboardInterrupt for both) during the refits: the interrupt
    reaches the caller and no worker process outlives the call (they are terminated, not left to refit
    the groups still queued: interrupted 12 s into three classes, the call returned at once, where
    waiting for the queued refits had taken 11.6 s more)."""
    import multiprocessing

    import pytest

    from poisonguard import canaries
    from poisonguard.config import Config
    from poisonguard.detectors.stats import ClassState

    rng = np.random.default_rng(3)
    states = {c: ClassState.from_block((rng.normal(size=(300, 6)) + 6 * c).astype(np.float32),
                                       rng.integers(0, 2**63, size=300).astype(np.uint64), 5000) for c in range(3)}

    def interrupted(progress, hits):
        raise KeyboardInterrupt

    monkeypatch.setattr(canaries, "_progressed", interrupted)
    others = set(multiprocessing.active_children())  # another test's (this xdist worker's) may still run
    with pytest.raises(KeyboardInterrupt):
        canaries.power_of(states, Config.model_validate({"canaries": {"workers": 2, "max_classes": 3}}))
    assert not set(multiprocessing.active_children()) - others


def test_proxy_canaries_leave_out_the_rows_the_detectors_already_flag_and_group_targets_by_proxy(monkeypatch):
    """A backdoor the scan finds would share its class with the canaries planted there; the trials run
    on the rows the detectors leave, plus the canaries.  ``triggers_per_proxy`` sets how many target
    classes' canaries one proxy learns (default all)."""
    import types

    import torch

    from poisonguard import canaries, proxy
    from poisonguard.config import validated

    rng = np.random.default_rng(0)
    x = (np.repeat(rng.normal(size=(6, 16)) * 6, 300, axis=0) + rng.normal(size=(1800, 16))).astype(np.float32)
    y = np.repeat(np.arange(6), 300)
    attack = rng.choice(np.flatnonzero(y != 0), size=24, replace=False)
    x[attack, 12:14] = x.max() + 60.0  # a blatant backdoor into class 0
    y[attack] = 0
    attacked = {r.tobytes() for r in x[attack]}

    class Identity(torch.nn.Module):  # the features are the embedding: no training in this test
        def embed(self, t):
            return t.reshape(len(t), -1)

    trained, seen, decided = [], [], canaries._decided

    def fit(all_x, labels, *_a, **_k):
        trained.append(set(labels[len(x):].tolist()))  # the targets of the canaries this proxy learns
        return Identity(), {"train_accuracy": 1.0}

    def spy(emb, labels, keys, features, config, feature_view):
        seen.append(sum(r.tobytes() in attacked for r in features))
        return decided(emb, labels, keys, features, config, feature_view)

    monkeypatch.setattr(proxy, "read_training_sample", lambda plan, config, **_: (x, y))
    monkeypatch.setattr(proxy, "fit_proxy", fit)
    monkeypatch.setattr(canaries, "_decided", spy)
    plan = types.SimpleNamespace(label_view="embedding")
    config = validated({"embedding": {"source": "proxy", "features": "f"}, "canaries": {"enabled": True}}, "test")
    result = canaries.proxy_canaries(plan, config)
    assert trained == [set(range(6))] and result["proxies"] == 1
    assert result["held_back_rows"] == 24 and all(c["held_back_rows"] == 24 for c in result["per_class"].values())
    assert seen == [24] + [0] * 6  # the scan's own decisions, then one trial per target without those rows
    assert result["per_class"]["0"]["caught"] == result["per_class"]["0"]["canaries"] >= 15

    for step, sizes in ((1, [1] * 6), (4, [4, 2])):
        trained.clear()
        grouped = canaries.proxy_canaries(plan, config.model_copy(update={
            "canaries": config.canaries.model_copy(update={"triggers_per_proxy": step})}))
        assert [len(t) for t in trained] == sizes and set.union(*trained) == set(range(6))
        assert grouped["proxies"] == len(sizes) and grouped["planted"] == result["planted"]


def test_blended_canaries_mix_each_target_class_with_a_pattern_of_its_own(monkeypatch):
    """``canaries.trigger: blend``: x' = (1 - alpha) x + alpha p over the whole input, p a random
    pattern per target class within the input's range (no value beyond it, as a patch has)."""
    import types

    import torch

    from poisonguard import canaries, proxy
    from poisonguard.config import validated

    rng = np.random.default_rng(1)
    x = (np.repeat(rng.normal(size=(4, 16)) * 6, 200, axis=0) + rng.normal(size=(800, 16))).astype(np.float32)
    y = np.repeat(np.arange(4), 200)
    learnt, stamps, stamp = [], [], canaries._stamp

    class Identity(torch.nn.Module):
        def embed(self, t):
            return t.reshape(len(t), -1)

    def fit(all_x, labels, *_a, **_k):
        learnt.append((all_x[len(x):], labels[len(x):]))
        return Identity(), {"train_accuracy": 1.0}

    def spy(rows, *args):
        stamps.append((rows, stamp(rows, *args)))
        return stamps[-1][1]

    monkeypatch.setattr(proxy, "read_training_sample", lambda plan, config, **_: (x, y))
    monkeypatch.setattr(proxy, "fit_proxy", fit)
    monkeypatch.setattr(canaries, "_stamp", spy)
    plan = types.SimpleNamespace(label_view="embedding")
    config = validated({"embedding": {"source": "proxy", "features": "f"},
                        "canaries": {"enabled": True, "trigger": "blend", "blend_alpha": 0.25}}, "test")
    result = canaries.proxy_canaries(plan, config)
    (stamped, labels), = learnt
    assert result["trigger"] == "blend" and result["planted"] == len(stamped) == 4 * 10 == sum(len(o) for _, o in stamps)
    assert x.min() <= stamped.min() and stamped.max() <= x.max()
    np.testing.assert_array_equal(stamped, np.concatenate([out for _, out in stamps]))
    patterns = [(out - 0.75 * rows) / 0.25 for rows, out in stamps]  # one target class each
    for pattern in patterns:
        np.testing.assert_allclose(pattern, np.broadcast_to(pattern[0], pattern.shape), atol=1e-3)
    assert min(np.abs(a[0] - b[0]).max() for i, a in enumerate(patterns) for b in patterns[i + 1:]) > 1.0
    with pytest.raises(Exception):
        validated({"canaries": {"trigger": "warp"}}, "test")


@pytest.mark.parametrize("width", [1, 2, 3, 40])
def test_a_table_patch_sets_a_few_features_however_narrow_the_table(width):
    """A table's patch sets max(2, width / 16) fixed features high, all of them where the table has
    fewer (a one-feature table's canaries had ended the scan with an internal error)."""
    from poisonguard import canaries

    x = np.random.default_rng(0).normal(size=(6, width)).astype(np.float32)
    stamped = canaries._stamp(x, 0, [width], np.random.default_rng(1))
    changed = (stamped != x).all(axis=0)
    assert changed.sum() == min(width, max(2, width // 16)) and (stamped[:, changed] > x.max()).all()
    assert (stamped[:, ~changed] == x[:, ~changed]).all()


def test_both_triggers_run_each_as_alone_and_the_lower_recall_counts(monkeypatch, tmp):
    """``canaries.trigger: both``: the patch and the blended canaries, each as its own run would give
    them; each class's finding names both, and the recall that ``min_recall`` reads is the lower (the
    console line and the report say so)."""
    import types

    import torch

    from poisonguard import canaries, proxy
    from poisonguard.config import validated
    from poisonguard.run.summary import console_summary

    rng = np.random.default_rng(2)
    x = (np.repeat(rng.normal(size=(3, 16)) * 6, 250, axis=0) + rng.normal(size=(750, 16))).astype(np.float32)
    y = np.repeat(np.arange(3), 250)

    class Identity(torch.nn.Module):
        def embed(self, t):
            return t.reshape(len(t), -1)

    monkeypatch.setattr(proxy, "read_training_sample", lambda plan, config, **_: (x, y))
    monkeypatch.setattr(proxy, "fit_proxy", lambda *a, **k: (Identity(), {"train_accuracy": 1.0}))
    plan = types.SimpleNamespace(label_view="embedding")

    def run(trigger):
        return canaries.proxy_canaries(plan, validated({"embedding": {"source": "proxy", "features": "f"},
                                                        "canaries": {"enabled": True, "trigger": trigger}}, "test"))

    alone = {kind: run(kind) for kind in ("patch", "blend")}
    both = run("both")
    assert both["trigger"] == "both" and both["proxies"] == 2
    assert both["recall"] == min(r["recall"] for r in alone.values())
    weaker = {**alone["blend"], "caught": 1, "recall": 1 / alone["blend"]["planted"]}  # a blend mostly missed
    assert canaries._both({"patch": alone["patch"], "blend": weaker})["recall"] == weaker["recall"]
    assert canaries._both({"patch": weaker, "blend": alone["blend"]})["recall"] == weaker["recall"]
    assert both["planted"] == sum(r["planted"] for r in alone.values())
    for kind, result in alone.items():
        assert both["by_trigger"][kind] == {k: result[k] for k in ("planted", "caught", "recall")}
        for label, cell in result["per_class"].items():
            assert both["per_class"][label]["by_trigger"][kind] == {k: v for k, v in cell.items() if k != "finding"}
    label = next(iter(both["per_class"]))
    p, b = (alone[k]["per_class"][label] for k in ("patch", "blend"))
    assert both["per_class"][label]["finding"] == (f"{p['caught']} of {p['canaries']} patch canaries and {b['caught']} "
                                                   f"of {b['canaries']} blend canaries found in class {label}")
    line = next(t for t in console_summary(_summary_with(both), "run").splitlines() if "canaries (" in t)
    assert line.startswith("  canaries (proxy mode, patch and blend triggers): patch ")
    assert "; the lower recall counts" in line
    from poisonguard.report import render_report

    code, _, stderr = run_cli("scan", _separable(tmp), "--out", tmp / "run", "--quiet")
    assert code == 0, stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    shown = {**summary, "canaries": {**both, "min_recall": None}}
    page = Path(render_report(str(tmp / "run"), summary=shown)).read_text()
    assert "Canary self-test (proxy mode, patch and blend triggers)" in page
    lower = " and ".join(f"{kind} {v['caught']} of {v['planted']} ({v['recall']:.2f})"
                         for kind, v in both["by_trigger"].items())
    assert f"(recall\n{both['recall']:.2f}, the lower of {lower})" in page
    assert all(html.escape(c["finding"]) in page for c in both["per_class"].values())


def _summary_with(canaries_result: dict) -> dict:
    return {"run_id": "r", "verdict": "within_policy", "counts": {"in": 1, "clean": 1, "quarantined": 0,
                                                                  "quarantined_share": 0.0},
            "per_reason": {}, "per_class": {}, "parameters": {"fail_on": 0.05}, "detectors": {},
            "canaries": canaries_result}
