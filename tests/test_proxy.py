"""The proxy's architecture follows what the features are; its fit is measured and recorded."""

from __future__ import annotations

import json
import types

import numpy as np
import pyarrow as pa
import pytest
from sklearn.datasets import load_breast_cancer, load_digits, load_sample_images

from conftest import run_cli, write
from poisonguard.config import Config
from poisonguard.errors import InputError
from poisonguard.layout import infer_layout


def _signals(n=600, length=64, seed=0):
    """Windowed sinusoids of a class frequency, shifted at random: order matters, position does not."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)
    y = np.arange(n) % 3
    shift = rng.integers(0, length, size=n)
    freq = np.array([0.05, 0.12, 0.3])[y]
    x = np.sin(2 * np.pi * freq[:, None] * t) * np.exp(-0.5 * (((t + shift[:, None]) % length - 32) / 8.0) ** 2)
    return (x + rng.normal(scale=0.1, size=x.shape)).astype(np.float32), y


def _patches(size=8):
    """Grey patches cut from the two photographs scikit-learn ships (not a source the rule was chosen on)."""
    out = []
    for image in load_sample_images().images:
        grey = image.mean(axis=2)
        out += [grey[r:r + size, c:c + size].ravel() for r in range(0, grey.shape[0] - size, 3 * size)
                for c in range(0, grey.shape[1] - size, 3 * size)]
    return np.asarray(out, np.float32)


def test_layout_tells_images_sequences_and_tables_apart():
    digits = load_digits().data.astype(np.float32)
    assert infer_layout(digits, None).shape == [1, 8, 8]
    assert infer_layout(_patches(8), None).kind == "image"
    assert infer_layout(_patches(16), None).shape == [1, 16, 16]
    signals, _ = _signals()
    assert infer_layout(signals, None).shape == [1, 64]
    assert infer_layout(load_breast_cancer().data, None).kind == "table"
    # the same pixels with their columns shuffled carry no order: a table
    shuffled = digits[:, np.random.default_rng(0).permutation(64)]
    layout = infer_layout(shuffled, None)
    assert layout.kind == "table" and layout.evidence["abs_autocorr_lag1"] < 1.6 * layout.evidence["abs_autocorr_shuffled"]
    assert infer_layout(np.random.default_rng(1).normal(size=(500, 8)), None).why.startswith("8 values")


def test_a_declared_shape_decides():
    x = np.random.default_rng(0).normal(size=(100, 12)).astype(np.float32)
    assert infer_layout(x, [3, 2, 2]).kind == "image"
    assert infer_layout(x, [2, 6]).shape == [2, 6]


def _plan(n_features):
    return types.SimpleNamespace(n_features=n_features)


def _config(**embedding):
    return Config.model_validate({"seed": 3, "embedding": {"source": "proxy", "features": "f", "device": "cpu",
                                                           "proxy_epochs": 40, **embedding}})


def _data(name):
    if name == "images":
        d = load_digits()
        return (d.data / 16).astype(np.float32)[:600], d.target[:600]
    if name == "signals":
        return _signals()
    d = load_breast_cancer()
    return d.data.astype(np.float32), d.target


@pytest.mark.parametrize("data, layout, architecture, stop", [
    ("images", "image", "cnn(shape=[1, 8, 8], width=32)", "held_out"),
    ("signals", "sequence", "cnn(shape=[1, 64], width=32)", "held_out"),
    ("table", "table", "mlp(hidden=[128, 32])", "train_loss")])
def test_default_proxy_is_chosen_from_the_layout_and_its_fit_is_recorded(data, layout, architecture, stop):
    """The development families chose a CNN over the inferred shape for images and sequences,
    early-stopped on held-out rows, and an MLP trained to near-zero loss for tables
    (poisonguard.proxy.fit_proxy)."""
    from poisonguard.proxy import fit_proxy

    x, y = _data(data)
    model, info = fit_proxy(x, y, _plan(x.shape[1]), _config())
    assert info["architecture"] == architecture and info["layout"]["kind"] == layout and info["stop_rule"] == stop
    assert info["held_out_rows"] == round(0.1 * len(x)) and info["train_rows"] == len(x) - info["held_out_rows"]
    assert info["train_accuracy"] > 0.9 and 0.5 < info["held_out_accuracy"] <= 1.0
    assert info["stopped"] in ("target_loss", "plateau", "held_out_plateau", "max_epochs") and 1 <= info["epochs"] <= 40
    assert info["converged"] == (info["stopped"] != "max_epochs")
    if stop == "held_out":
        assert 1 <= info["kept_epoch"] <= info["epochs"]
    import torch

    with torch.no_grad():  # the proxy reads the flat feature rows a fixed-size list column holds
        assert model.embed(torch.from_numpy(x[:5])).shape == (5, 32)


@pytest.mark.parametrize("data, shape", [("images", [1, 8, 8]), ("signals", [1, 64])])
def test_a_cnn_proxy_convolves_over_the_inferred_shape(data, shape):
    from poisonguard.proxy import fit_proxy

    x, y = _data(data)
    model, info = fit_proxy(x, y, _plan(x.shape[1]), _config(proxy_architecture="cnn", proxy_epochs=5))
    assert info["architecture"] == f"cnn(shape={shape}, width=32)"
    import torch

    with torch.no_grad():
        assert model.embed(torch.from_numpy(x[:3])).shape == (3, 32)


@pytest.mark.parametrize("shape, stride", [([1, 8, 8], 1), ([1, 16, 16], 1), ([1, 28, 28], 2), ([3, 32, 32], 2),
                                           ([1, 64], 1), ([1, 256], 4), ([2, 1000], 16)])
def test_a_cnn_strides_over_inputs_larger_than_the_families_and_reads_every_value(shape, stride):
    """Images over 16 a side and sequences over 64 steps: the first convolution strides down to that
    grid (the unstrided network trains 4-10 times slower there) with a kernel wide enough to read
    every input value; the development families' sizes keep stride 1."""
    import torch

    from poisonguard.proxy import ProxyCNN, cnn_stride

    assert cnn_stride(shape) == stride
    torch.manual_seed(0)
    model = ProxyCNN(shape, 3, 32, torch.zeros(1), torch.ones(1))
    first = model.conv[0]
    assert first.stride[0] == stride and first.kernel_size[0] >= stride
    n = int(np.prod(shape))
    x = torch.zeros(1, n, requires_grad=True)
    model.embed(x).sum().backward()
    assert bool((x.grad != 0).all())  # no input value is skipped by the stride
    scripted = torch.jit.script(model)
    assert scripted.embed(torch.randn(4, n)).shape == (4, 32)


def test_early_stopping_keeps_the_best_held_out_epoch():
    """Flipped labels contradict their features: a network early-stopped on held-out rows has not
    memorised them yet, so it still predicts their true class.  Read on the MLP, the proxy that
    memorises fastest (digits' CNN trained to the training target still predicts 79% of them)."""
    from poisonguard.proxy import fit_proxy

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target.copy()
    flipped = np.random.default_rng(0).choice(len(y), size=180, replace=False)
    y[flipped] = (y[flipped] + 1) % 10
    runs = {}
    for stop in ("held_out", "train_loss"):
        model, info = fit_proxy(x, y, _plan(64), _config(proxy_architecture="mlp", proxy_stop=stop, proxy_epochs=150))
        import torch

        with torch.no_grad():
            predicted = model(torch.from_numpy(x[flipped])).argmax(1).numpy()
        runs[stop] = (float(np.mean(predicted == d.target[flipped])), info)
    assert runs["held_out"][1]["stopped"] in ("held_out_plateau", "max_epochs")
    assert runs["held_out"][0] >= 0.7 and runs["held_out"][0] > runs["train_loss"][0] + 0.2


def test_the_held_out_rule_also_stops_once_every_training_row_is_fit():
    """A network that fits its training rows (loss under proxy_target_loss) has learnt what a
    backdoor teaches; the held-out rule stops there too, with that epoch's weights, instead of
    training on while the held-out loss still creeps down (which blurred the poison into its class)."""
    import torch

    from poisonguard.proxy import _train

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    y = np.arange(400) % 2
    x = (rng.normal(size=(400, 8)) + 3.0 * y[:, None]).astype(np.float32)  # separable: training loss -> 0
    y[380:] = 1 - y[380:]  # half the held-out rows mislabelled: the held-out loss never gets there
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    train, test = torch.arange(360), torch.arange(360, 400)
    emb = _config(proxy_target_loss=0.05, proxy_patience=1000, proxy_epochs=200).embedding
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    fit = _train(model, xt, yt, train, test, emb, "held_out", seed=0)
    assert fit["stopped"] == "target_loss" and fit["final_training_loss"] < 0.05
    assert fit["epochs"] < 200 and fit["kept_epoch"] == fit["epochs"]
    with torch.no_grad():  # the weights kept are those of the stopping epoch
        loss = torch.nn.functional.cross_entropy(model(xt[train]), yt[train])
    assert float(loss) < 0.05


def test_training_stops_at_the_epoch_budget_and_says_so():
    from poisonguard.proxy import fit_proxy

    x, y = _signals(300)
    _, info = fit_proxy(x, y, _plan(64), _config(proxy_epochs=2, proxy_target_loss=0.0))
    assert info == {**info, "epochs": 2, "stopped": "max_epochs", "converged": False}


def test_the_trained_proxy_does_not_depend_on_the_callers_thread_count(monkeypatch):
    """The backward pass sums a minibatch's gradients in one chunk per thread: the same seed gave
    other weights (and other decisions) on a machine with other cores, or under another OpenMP
    setting.  The proxy trains on one thread and gives the caller's count back."""
    import torch

    from poisonguard.proxy import fit_proxy

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    before = torch.get_num_threads()
    hashes = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            _, info = fit_proxy(x, y, _plan(64), _config(proxy_epochs=3))
            assert torch.get_num_threads() == threads
            hashes.append(info["weights_sha256"])
    finally:
        torch.set_num_threads(before)
    assert hashes[0] == hashes[1] and info["train_threads"] == 1
    seen, original = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), original(n)))
    _, info = fit_proxy(x, y, _plan(64), _config(proxy_epochs=1, proxy_threads=2))  # faster, machine-dependent
    assert info["train_threads"] == 2 and seen == [2, before]


def test_a_cnn_on_a_table_is_refused_with_the_reason():
    from poisonguard.proxy import fit_proxy

    d = load_breast_cancer()
    with pytest.raises(InputError, match="features_shape"):
        fit_proxy(d.data.astype(np.float32), d.target, _plan(30), _config(proxy_architecture="cnn"))


def test_scan_summary_and_report_name_the_proxy_and_its_fit(tmp):
    x, y = _signals(400)
    table = pa.table({"id": pa.array([f"s{i}" for i in range(len(y))]), "label": pa.array(y),
                      "wave": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)})
    path = write(table, tmp / "signals.parquet")
    code, stdout, stderr = run_cli("scan", path, "--out", tmp / "run", "--set", "embedding.source=proxy",
                                   "--set", "embedding.features=wave", "--set", "embedding.device=cpu",
                                   "--set", "embedding.proxy_epochs=30")
    assert code == 0, stderr
    summary = json.loads((tmp / "run" / "summary.json").read_text())
    info = summary["embedding"]
    assert info["architecture"] == "cnn(shape=[1, 64], width=32)" and info["layout"]["kind"] == "sequence"
    assert info["stop_rule"] == "held_out"
    assert {"train_accuracy", "held_out_accuracy", "epochs", "stopped", "converged"} <= set(info)
    assert "proxy: cnn(shape=[1, 64], width=32) for sequence data" in stdout and "held-out" in stdout
    report = (tmp / "run" / "report.html").read_text()
    assert 'id="proxy-fit"' in report and "held-out" in report
    log = [json.loads(line) for line in (tmp / "run" / "provenance.jsonl").read_text().splitlines()]
    assert log[-1]["run"]["facets"]["poisonguard_embedding"]["held_out_accuracy"] == info["held_out_accuracy"]


def _flipped_table(tmp):
    """Breast cancer with 20% of class 0 relabelled 1 (a targeted flip, as benchmarks/families.py makes one)."""
    d = load_breast_cancer()
    x, y = d.data.astype(np.float32), d.target.copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(np.flatnonzero(y == 0), size=int(round(0.2 * (y == 0).sum())), replace=False)
    y[flipped] = 1
    truth = np.zeros(len(y), bool)
    truth[flipped] = True
    table = pa.table({"id": pa.array([f"r{i}" for i in range(len(y))]), "label": pa.array(y),
                      "f": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])})
    return write(table, tmp / "flipped.parquet"), truth


def _every_score(run) -> dict:
    """Each detector's score of every row (clean and quarantined), by id."""
    import pyarrow.dataset as ds

    parts = [ds.dataset(str(run / part), format="parquet") for part in ("clean", "quarantine")]
    columns = ["id"] + [name for name in parts[1].schema.names if name.startswith("score_")]
    table = pa.concat_tables([part.to_table(columns=columns) for part in parts]).sort_by("id")
    return {name: table[name].to_numpy(zero_copy_only=False) for name in columns[1:]}


def _confident_flags(run) -> np.ndarray:
    import pyarrow.dataset as ds

    from poisonguard.names import QUARANTINE_REASONS

    held = ds.dataset(str(run / "quarantine"), format="parquet").to_table(columns=["id", QUARANTINE_REASONS])
    out = np.zeros(569, bool)
    out[[int(r["id"][1:]) for r in held.to_pylist() if "detector:confident_label" in r[QUARANTINE_REASONS]]] = True
    return out


def test_on_a_table_confident_learning_reads_the_features_the_proxy_never_fitted(tmp):
    """A proxy trained to near-zero loss on a table memorises flipped labels; confident learning on the
    feature column (label_view auto -> features) still finds them, on both engines alike."""
    path, truth = _flipped_table(tmp)
    proxy = ["--set", "embedding.source=proxy", "--set", "embedding.features=f", "--set", "embedding.device=cpu"]
    # the k-NN label check scores every row, so that its feature vote shows where no class is flagged
    every = [d.model_dump() for d in Config().detectors]
    next(d for d in every if d["name"] == "knn_label")["params"]["score_every_row"] = True
    (tmp / "every.yaml").write_text(json.dumps({"detectors": every}))
    runs = {}
    for name, extra in (("features", []), ("beam", ["--engine", "beam"]),
                        ("embedding", ["--set", "embedding.label_view=embedding"])):
        code, _, stderr = run_cli("scan", path, "--out", tmp / name, "--quiet", "--config", tmp / "every.yaml",
                                  *proxy, *extra)
        assert code in (0, 1), stderr
        runs[name] = _confident_flags(tmp / name)
    summary = json.loads((tmp / "features" / "summary.json").read_text())
    assert summary["embedding"]["layout"]["kind"] == "table" and summary["embedding"]["label_view"] == "features"
    votes = summary["detectors"]["knn_label"]["representation"]["feature_votes"]
    assert "nearest rows in the feature column" in votes  # and the reviewer's page says so
    assert f'id="feature-votes-knn_label">Label check knn_label, corroborated by the feature column: {votes}' in \
        (tmp / "features" / "report.html").read_text()
    assert "feature-votes" not in (tmp / "embedding" / "report.html").read_text()
    found = runs["features"]
    assert found[truth].mean() >= 0.6 and found[~truth].mean() <= 0.01
    assert np.array_equal(runs["beam"], found)
    assert runs["embedding"][truth].mean() <= 0.3  # the memorising proxy hides them
    # every detector's score of every row alike on both engines, the k-NN check's feature vote included
    scores = {name: _every_score(tmp / name) for name in runs}
    assert scores["features"].keys() == scores["beam"].keys()
    for column, values in scores["features"].items():
        assert np.array_equal(values, scores["beam"][column], equal_nan=True), column
    voted, alone = scores["features"]["score_knn_label"], scores["embedding"]["score_knn_label"]
    assert np.isfinite(voted).all() and (voted < alone).any()  # the vote lowered rows the features disown


def test_the_feature_view_needs_a_feature_column():
    with pytest.raises(ValueError, match="label_view features needs a feature column"):
        Config.model_validate({"embedding": {"label_view": "features"}})


def test_no_row_with_finite_features_is_exit_2_naming_the_file_and_column(tmp):
    """Every row's feature column holds a NaN somewhere: the proxy has nothing to train on (was a
    ValueError from the training loop, exit 3)."""
    x = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    x[:, 3] = np.nan
    table = pa.table({"id": pa.array([f"r{i}" for i in range(60)]), "label": pa.array(np.arange(60) % 3),
                      "f": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)})
    path = write(table, tmp / "nan.parquet")
    code, _, stderr = run_cli("scan", path, "--out", tmp / "run", "--set", "embedding.source=proxy",
                              "--set", "embedding.features=f", "--set", "embedding.device=cpu")
    line = [ln for ln in stderr.splitlines() if "nothing to train the proxy on" in ln]
    assert code == 2 and line and "nan.parquet" in line[0] and "'f'" in line[0], stderr
    assert not (tmp / "run").exists() and "Traceback" not in stderr
