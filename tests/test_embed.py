"""Embeddings from a model or a proxy: safe loading, dimension checks, determinism, same decisions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import POISONED, ROOT, TRUTH, error_lines, read_outputs, run_cli, snapshot, write

MODEL = ROOT / "data" / "samples" / "digits_poisoned_model.pt"
SUITE = ROOT / "expectations" / "digits_suite.json"


def _model_args(model, *extra):
    return ["--set", "embedding.source=model", "--set", "embedding.features=pixels",
            "--set", f"embedding.model={model}", "--set", f"suite={SUITE}", *extra]


def _recall_fpr(run_dir):
    _, held = read_outputs(run_dir)
    truth = pq.read_table(TRUTH).to_pandas().set_index("id")
    ids = set(held.column("id").to_pylist())
    poisoned = set(truth.index[truth.poisoned])
    return len(ids & poisoned) / len(poisoned), len(ids - poisoned) / (len(truth) - len(poisoned))


def test_pickled_whole_module_is_refused_without_running_it(tmp):
    class Evil(torch.nn.Module):
        def __reduce__(self):
            return (open, (str(tmp / "pwned"), "w"))

    torch.save(Evil(), tmp / "evil.pt")
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(tmp / "evil.pt"))
    assert code == 2, stderr
    line = error_lines(stderr)[0]
    assert "evil.pt" in line and "refused" in line and "unpickling" in line
    assert "Traceback" not in stderr
    assert not (tmp / "pwned").exists()
    assert not (tmp / "run").exists()


def test_model_output_dimension_must_match_the_config(tmp):
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(MODEL, "--set", "embedding.dim=16"))
    assert code == 2
    assert "model output dimension 32 disagrees with embedding.dim=16" in error_lines(stderr)[0]


def test_missing_model_file_and_missing_features_column(tmp):
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(tmp / "nope.pt"))
    assert code == 2 and "model file not found" in error_lines(stderr)[0]
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(MODEL),
                              "--set", "embedding.features=ghost")
    assert code == 2 and "'ghost'" in error_lines(stderr)[0] and "missing features column" in error_lines(stderr)[0]


class _OneRowOut(torch.nn.Module):
    @torch.jit.export
    def embed(self, x):
        return x[:1, :4]


class _TwoTensors(torch.nn.Module):
    @torch.jit.export
    def embed(self, x):
        return x[:, :4], x[:, 4:8]


class _FailsOnSomeRows(torch.nn.Module):
    @torch.jit.export
    def embed(self, x):
        if bool((x > 15.5).any()):  # digits' pixels reach 16: not the zeros of the dimension check
            raise RuntimeError("a value this model cannot take")
        return x[:, :8]


@pytest.mark.parametrize("model,needle", [
    (_OneRowOut, "must give one row out per row in"),
    (_TwoTensors, "is a tuple, not one tensor"),
    (_FailsOnSomeRows, "the model failed on a batch of"),
])
def test_a_model_that_misbehaves_is_exit_2_naming_it(tmp, model, needle):
    """The user's model, not poisonguard, is at fault: exit 2 naming the model file (each of these
    ended in an internal error, exit 3); TorchScript's error is kept to its last line."""
    torch.jit.script(model()).save(str(tmp / "m.pt"))
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(tmp / "m.pt"))
    assert code == 2, stderr
    line = error_lines(stderr)[0]
    assert "m.pt" in line and needle in line and not (tmp / "run").exists()
    if model is _FailsOnSomeRows:
        assert line.endswith("RuntimeError: a value this model cannot take")


def test_torchscript_model_mode_reproduces_column_mode(tmp):
    code, _, _ = run_cli("scan", POISONED, "--out", tmp / "col", "--set", f"suite={SUITE}", "--quiet")
    assert code == 0
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "model", *_model_args(MODEL), "--quiet")
    assert code in (0, 1), stderr
    _, held_col = read_outputs(tmp / "col")
    _, held_model = read_outputs(tmp / "model")
    assert sorted(held_col.column("id").to_pylist()) == sorted(held_model.column("id").to_pylist())
    a, b = held_col.sort_by("id"), held_model.sort_by("id")
    assert a.column("quarantine_reasons").to_pylist() == b.column("quarantine_reasons").to_pylist()
    np.testing.assert_allclose(a.column("score_spectre").to_numpy(), b.column("score_spectre").to_numpy(), rtol=1e-4)
    summary = json.loads((tmp / "model" / "summary.json").read_text())
    assert summary["embedding"]["source"] == "model" and len(summary["embedding"]["model_file_sha256"]) == 64


def test_state_dict_with_named_architecture(tmp):
    from poisonguard.embed import build_mlp

    torch.manual_seed(0)
    model = build_mlp(64, [48, 24], 10)
    torch.save(model.state_dict(), tmp / "weights.pt")
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run", *_model_args(tmp / "weights.pt"),
                              "--set", "embedding.architecture=mlp", "--set", "embedding.hidden=[48, 24]", "--quiet")
    assert code in (0, 1), stderr
    assert json.loads((tmp / "run" / "summary.json").read_text())["embedding"]["dim"] == 24
    code, _, stderr = run_cli("scan", POISONED, "--out", tmp / "run2", *_model_args(tmp / "weights.pt"))
    assert code == 2 and "architecture: mlp" in error_lines(stderr)[0]


@pytest.fixture(scope="module")
def no_embedding(tmp_path_factory):
    path = tmp_path_factory.mktemp("proxy") / "digits_no_embedding.parquet"
    return write(pq.read_table(POISONED).drop_columns(["embedding"]), path)


def _proxy(no_embedding, out, *extra):
    return run_cli("scan", no_embedding, "--out", out, "--set", "embedding.source=proxy",
                   "--set", "embedding.features=pixels", "--set", "embedding.device=cpu", "--set", f"suite={SUITE}",
                   "--quiet", *extra)


def test_proxy_mode_finds_the_backdoor_without_an_embedding_column(tmp, no_embedding):
    code, _, stderr = _proxy(no_embedding, tmp / "run")
    assert code == 0, stderr
    recall, fpr = _recall_fpr(tmp / "run")
    assert recall >= 0.8, recall  # 46 of 54 with the defaults the development families chose
    assert fpr < 0.01, fpr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    info = summary["embedding"]
    assert info["train_accuracy"] > 0.99 and len(info["weights_sha256"]) == 64
    assert info["layout"]["shape"] == [1, 8, 8] and info["stop_rule"] == "held_out"
    assert (tmp / "run" / "proxy_model.pt").is_file()
    log = [json.loads(line) for line in (tmp / "run" / "provenance.jsonl").read_text().splitlines()]
    assert log[-1]["run"]["facets"]["poisonguard_embedding"]["weights_sha256"] == info["weights_sha256"]


def test_proxy_is_deterministic_under_a_seed_on_cpu(tmp, no_embedding):
    runs = []
    for name in ("a", "b"):  # the exclusion check's second proxy: its determinism in tests/test_exclusion.py
        code, _, stderr = _proxy(no_embedding, tmp / name, "--set", "embedding.proxy_epochs=8",
                                 "--set", "embedding.proxy_exclusion=false")
        assert code in (0, 1), stderr
        summary = json.loads((tmp / name / "summary.json").read_text())
        _, held = read_outputs(tmp / name)
        runs.append((summary["embedding"]["weights_sha256"], sorted(held.column("id").to_pylist())))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("engine", ["memory", "beam"])
def test_model_mode_runs_inference_once_per_row(tmp, engine):
    config = ROOT / "configs" / "digits_model.yaml"
    runs = {}
    for name, extra in (("spill", []), ("again", ["--set", "embedding.spill=false"])):
        code, _, stderr = run_cli("scan", POISONED, "--out", tmp / name, "--config", config, "--quiet",
                                  "--run-id", "same", "--engine", engine, *extra)
        assert code == 0, stderr
        runs[name] = json.loads((tmp / name / "summary.json").read_text())
    assert runs["spill"]["model_rows_in_score_pass"] == 0  # the score pass read pass 1's embeddings
    assert runs["again"]["model_rows_in_score_pass"] == 1797
    parts = [{k: v for k, v in snapshot(tmp / name).items() if k.startswith(("clean/", "quarantine/"))}
             for name in ("spill", "again")]
    assert parts[0] == parts[1] and parts[0]
