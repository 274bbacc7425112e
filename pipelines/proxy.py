"""The proxy model: a small network trained on the dataset's own features and labels.

Backdoors show in the representation of a model trained on the poisoned data, so for users who
bring no model poisonguard trains one: an MLP (or, with ``proxy_architecture: cnn``, a small CNN
on images of ``features_shape`` [C, H, W]; on the digits sample the MLP's embedding separated the
backdoor better: recall 0.89 vs 0) on a bounded, seeded sample, to near-zero training loss, deterministically on CPU.  Its
penultimate activations are the embeddings.  It is exported as TorchScript and then used exactly
like a user's model.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from poisonguard.core.block import hash_strings, seeded_hash_key
from poisonguard.embed import features_to_numpy, weights_sha256
from poisonguard.io import read_batches, work_items

log = logging.getLogger("poisonguard")


class ProxyMLP(torch.nn.Module):
    def __init__(self, n_features: int, hidden: list[int], n_classes: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        layers: list[torch.nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(width, n_classes)

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features((x.reshape(x.shape[0], -1) - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class ProxyCNN(torch.nn.Module):
    def __init__(self, channels: int, n_classes: int, width: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.conv = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 16, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
            torch.nn.Linear(32 * 16, width), torch.nn.ReLU(),
        )
        self.head = torch.nn.Linear(width, n_classes)

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def read_training_sample(plan, config) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a seeded id hash under a cut chosen to keep ~proxy_max_rows rows (one streaming pass)."""
    cols, emb = config.columns, config.embedding
    share = emb.proxy_max_rows / max(plan.total_rows, 1)
    cut = np.uint64(2**64 - 1) if share >= 1 else np.uint64(int(share * 2**64))
    xs, ys = [], []
    for item in work_items(plan, 1 << 62):  # through the reader that checks each file is the one hashed
        for _, table in read_batches(item, [cols.id, cols.label, emb.features], 65536):
            batch = table.combine_chunks()
            ids = np.asarray(batch.column(0).cast("string").to_numpy(zero_copy_only=False), dtype=object)
            keep = hash_strings(np.where(ids == None, "", ids).astype(object), seeded_hash_key(config.seed)) <= cut  # noqa: E711
            keep &= ~np.asarray(batch.column(1).is_null(), dtype=bool)
            x, ok = features_to_numpy(batch.column(2), plan.n_features)
            keep &= ok
            xs.append(x[keep])
            ys.append(np.asarray(batch.column(1).to_numpy(zero_copy_only=False))[keep])
    return np.concatenate(xs), np.concatenate(ys)


def train_proxy(plan, config, out_path: str) -> dict:
    """Train the proxy on the data's bounded sample and save it as TorchScript; returns its record."""
    x, labels = read_training_sample(plan, config)
    model, info = fit_proxy(x, labels, plan, config)
    torch.jit.script(model).save(out_path)
    return info


def fit_proxy(x: np.ndarray, labels: np.ndarray, plan, config):
    """A proxy network trained on (x, labels), seeded: (model in eval mode, record of how it was trained)."""
    emb = config.embedding
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    classes, y = np.unique(labels, return_inverse=True)
    shape = list(emb.features_shape or [plan.n_features])
    xt = torch.from_numpy(x).reshape([-1, *shape])
    yt = torch.from_numpy(y.astype(np.int64))
    if emb.proxy_architecture == "cnn":
        mean, std = xt.mean(), xt.std().clamp_min(1e-6)
        model = ProxyCNN(shape[0], len(classes), emb.hidden[-1], mean.reshape(1), std.reshape(1))
        arch = f"cnn(channels={shape[0]}, width={emb.hidden[-1]})"
    else:
        mean, std = xt.mean(0), xt.std(0).clamp_min(1e-6)
        model = ProxyMLP(plan.n_features, list(emb.hidden), len(classes), mean, std)
        arch = f"mlp(hidden={list(emb.hidden)})"
    opt = torch.optim.Adam(model.parameters(), lr=emb.proxy_lr)
    generator = torch.Generator().manual_seed(config.seed)
    batch = len(xt) if len(xt) <= 20000 else 1024
    started, last = time.monotonic(), time.monotonic()
    for epoch in range(1, emb.proxy_epochs + 1):
        order = torch.randperm(len(xt), generator=generator) if batch < len(xt) else torch.arange(len(xt))
        for start in range(0, len(xt), batch):
            idx = order[start:start + batch]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        if time.monotonic() - last >= 5 or epoch == emb.proxy_epochs:
            last = time.monotonic()
            log.info("proxy: epoch %d/%d, loss %.4f, %.0f s", epoch, emb.proxy_epochs, loss.item(), time.monotonic() - started)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    return model, {"architecture": arch, "train_rows": int(len(xt)), "epochs": emb.proxy_epochs,
                   "train_accuracy": accuracy, "final_loss": float(loss.item()), "weights_sha256": weights_sha256(model),
                   "classes": [c.item() if isinstance(c, np.generic) else c for c in classes]}
