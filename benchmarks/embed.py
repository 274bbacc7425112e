"""Embedding throughput (rows/s) of the model and proxy modes, on CPU and, if present, CUDA.

Model mode: the digits sample's TorchScript model applied to a 64-float feature column, through the
same Embedder the pipeline uses (Arrow column in, Arrow embeddings out).  Proxy mode: training each
proxy (rows x epochs per second; the MLP that tables get and the CNN that images and sequences get,
this 8x8 pixel column's default) and then embedding with it.  Writes benchmarks/results/embed.md.

    python benchmarks/embed.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from poisonguard.config import Config  # noqa: E402
from poisonguard.embed import Embedder  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "embed.md"


def feature_column(rows: int) -> pa.Array:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    x = np.resize(x, (rows, 64))
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64)


def model_rate(path: str, column: pa.Array, device: str, emb) -> float:
    embedder = Embedder(path, emb, 64, device)
    embedder.setup()
    embedder(column.slice(0, 1000))
    start = time.perf_counter()
    for offset in range(0, len(column), 65536):
        embedder(column.slice(offset, 65536))
    return len(column) / (time.perf_counter() - start)


def proxy_rates(device_rows: int, epochs: int, architecture: str) -> tuple[float, str]:
    from poisonguard.io import InputFile, InputPlan
    from poisonguard.proxy import train_proxy
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    column = feature_column(device_rows)
    labels = np.resize(load_digits().target, device_rows)  # the rows' own labels (feature_column repeats them)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(device_rows)], "label": labels, "pixels": column}), data)
        config = Config.model_validate({"embedding": {"source": "proxy", "features": "pixels", "device": "cpu",
                                                      "proxy_architecture": architecture, "proxy_stop": "train_loss",
                                                      "proxy_target_loss": 0.0, "proxy_patience": epochs,
                                                      "proxy_epochs": epochs, "proxy_max_rows": device_rows}})
        plan = InputPlan((InputFile(0, str(data), device_rows, 1),), pq.read_schema(data), None, n_features=64)
        start = time.perf_counter()
        info = train_proxy(plan, config, str(Path(tmp) / "proxy.pt"))
        seconds = time.perf_counter() - start
        rate = device_rows * info["epochs"] / seconds  # the epochs it ran (every one: no stop rule can hold)
        infer = model_rate(str(Path(tmp) / "proxy.pt"), feature_column(200000), "cpu", config.embedding)
    return rate, f"{infer:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200000)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    emb = Config.model_validate({"embedding": {"source": "model", "features": "pixels", "model": "x"}}).embedding
    model = str(ROOT / "data" / "samples" / "digits_poisoned_model.pt")
    column = feature_column(args.rows)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = ["# Embedding throughput", "", f"torch {torch.__version__}, {os.cpu_count()} CPU cores, "
             f"torch threads {torch.get_num_threads()}; CUDA: "
             f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}.", "",
             "| mode | device | rows/s |", "|---|---|---|"]
    for device in devices:
        lines.append(f"| model (digits TorchScript MLP, 64 -> 32) | {device} | {model_rate(model, column, device, emb):,.0f} |")
    for architecture, name, epochs in (("mlp", "MLP 64-128-32", 20), ("cnn", "CNN 1x8x8, 16-32 channels", 3)):
        train_rate, infer = proxy_rates(20000, epochs, architecture)
        lines.append(f"| proxy training ({name}, minibatches of 256, one thread) | cpu | {train_rate:,.0f} row-epochs/s |")
        lines.append(f"| proxy embedding ({name}) | cpu | {infer} |")
    if not torch.cuda.is_available():
        lines += ["", "No CUDA device on this machine: run the same script on a GPU machine for the cuda row."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
