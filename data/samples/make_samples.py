"""Build the sample datasets from scikit-learn's bundled digits, deterministically.

digits_poisoned.parquet  BadNets-style backdoor: a 2x2 white patch stamped in the bottom-right
                         corner of 3% of the images of other classes, relabelled to class 0.
                         The embedding column is the 32-d penultimate layer of a small MLP
                         trained on this poisoned set (the backdoor is learned, see the printout).
digits_poisoned_truth.parquet   id, poisoned, original_label (kept apart from the data).
digits_poisoned_model.pt  that MLP as TorchScript (for the `model` embedding mode).
digits_clean.parquet     the same shape, no poison, embeddings from an MLP trained on clean data.

Columns: id (string), label (int64), pixels (fixed_size_list<float32>[64], 0..16),
embedding (fixed_size_list<float32>[32]).  Run: python data/samples/make_samples.py
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
SEED = 20261128  # which rows are poisoned
MODEL_SEED = 0  # torch seed of the embedding models (detection on these tiny models varies by seed; see README)
TARGET = 0
POISON_SHARE = 0.03
EMBED_DIM = 32


class DigitsMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, EMBED_DIM), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(EMBED_DIM, 10)

    def forward(self, x):
        return self.head(self.embed(x))

    @torch.jit.export
    def embed(self, x):
        """Raw pixels (0..16) in, 32-d embedding out: the scaling is part of the model."""
        return self.features(x / 16.0)


def stamp(images: np.ndarray) -> np.ndarray:
    out = images.copy().reshape(-1, 8, 8)
    out[:, 6:8, 6:8] = 16.0
    return out.reshape(-1, 64)


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int = 600) -> DigitsMLP:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()
    return model.eval()


def embed(model: DigitsMLP, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.embed(torch.tensor(x, dtype=torch.float32)).numpy()


def table(ids, labels, pixels, embeddings) -> pa.Table:
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "pixels": pa.FixedSizeListArray.from_arrays(pa.array(pixels.astype(np.float32).ravel()), 64),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.astype(np.float32).ravel()), EMBED_DIM),
    })


def main() -> None:
    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    ids = [f"digit-{i:05d}" for i in range(len(y))]
    rng = np.random.default_rng(SEED)

    others = np.flatnonzero(y != TARGET)
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[rng.choice(others, size=int(round(POISON_SHARE * len(y))), replace=False)] = True
    x_p, y_p = x.copy(), y.copy()
    x_p[poisoned] = stamp(x[poisoned])
    y_p[poisoned] = TARGET

    model = train(x_p, y_p, MODEL_SEED)
    with torch.no_grad():
        preds = model(torch.tensor(x_p)).argmax(1).numpy()
        triggered = model(torch.tensor(stamp(x[y != TARGET]))).argmax(1).numpy()
    print(f"poisoned model: train accuracy {np.mean(preds == y_p):.3f}, "
          f"attack success on stamped non-target images {np.mean(triggered == TARGET):.3f}")
    pq.write_table(table(ids, y_p, x_p, embed(model, x_p)), HERE / "digits_poisoned.parquet")
    pq.write_table(pa.table({"id": ids, "poisoned": poisoned, "original_label": y}), HERE / "digits_poisoned_truth.parquet")
    torch.jit.script(model).save(str(HERE / "digits_poisoned_model.pt"))

    clean_model = train(x, y, MODEL_SEED + 1)
    pq.write_table(table(ids, y, x, embed(clean_model, x)), HERE / "digits_clean.parquet")
    print(f"wrote {len(y)} rows per dataset ({poisoned.sum()} poisoned, target class {TARGET}) to {HERE}")
    for name in sorted(os.listdir(HERE)):
        print(f"  {name}: {os.path.getsize(HERE / name)} bytes")


if __name__ == "__main__":
    main()
