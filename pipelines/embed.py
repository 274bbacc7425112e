"""Embeddings from a feature column: the user's model (safely loaded) or a proxy model trained here.

Model files are never unpickled: a TorchScript archive (``torch.jit.load``) or a state dict read
with ``torch.load(weights_only=True)`` into a named architecture.  torch is imported lazily.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from poisonguard.errors import InputError, one_line

log = logging.getLogger("poisonguard")


def _torch():
    import torch

    return torch


def device_for(choice: str) -> str:
    torch = _torch()
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("embedding.device is cuda but no CUDA device is available")
    return choice


def build_mlp(in_features: int, hidden: list[int], n_classes: int):
    """The named architecture 'mlp': Linear+ReLU blocks (the embedding is the last one), a linear head."""
    torch = _torch()
    layers, width = [], in_features
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, n_classes))


def load_model(path: str, *, architecture: str | None, hidden: list[int], in_features: int, n_classes: int | None):
    """TorchScript, or a state dict for ``architecture``; anything that needs pickle is refused."""
    torch = _torch()
    try:
        return torch.jit.load(path, map_location="cpu").eval()
    except FileNotFoundError:
        raise InputError("model file not found", path=path) from None
    except (RuntimeError, ValueError):
        pass  # not a TorchScript archive: try a plain state dict
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ...
        raise InputError(
            "model file is neither TorchScript nor a plain state dict and would need unpickling arbitrary "
            "Python objects; refused (export it with torch.jit.script(model).save(...) or save its "
            f"state_dict()) [{one_line(exc)[:120]}]", path=path) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError("model file is not a state dict of tensors", path=path)
    if architecture != "mlp":
        raise InputError("a state-dict model needs embedding.architecture: mlp (with embedding.hidden)", path=path)
    last = [k for k in state if k.endswith(".weight")][-1]
    classes = n_classes or int(state[last].shape[0])
    model = build_mlp(in_features, hidden, classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"state dict does not fit the mlp architecture: {one_line(exc)[:200]}", path=path) from None
    return model.eval()


def embedding_fn(model, layer: str | None):
    """A callable features -> embedding: the named method/submodule, `embed`, `features`, or all but the head."""
    names = [layer] if layer else ["embed", "features"]
    for name in names:
        target = getattr(model, name, None)
        if target is not None and callable(target):
            return target
    if layer:
        raise InputError(f"model has no method or submodule named {layer!r} (embedding.layer)")
    children = list(model.children())
    if len(children) >= 2:
        body = children[:-1]

        def penultimate(x):
            for module in body:
                x = module(x)
            return x

        return penultimate
    raise InputError("cannot find the model's penultimate layer; name it with embedding.layer")


def features_to_numpy(column, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 features, ok mask): rows with null, ragged or non-finite features are not ok."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(column)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ok = ~np.asarray(pc.is_null(column), dtype=bool) & (np.nan_to_num(lengths.astype(float), nan=-1) == n_features)
    x = np.zeros((n, n_features), dtype=np.float32)
    if ok.any():
        values = pc.cast(column.filter(pa.array(ok)).flatten(), pa.float64()).to_numpy(zero_copy_only=False)
        values = values.reshape(-1, n_features)
        finite = np.isfinite(values).all(axis=1)
        rows = np.flatnonzero(ok)
        ok[rows[~finite]] = False
        x[rows[finite]] = values[finite].astype(np.float32)
    return x, ok


def model_error(exc: BaseException) -> str:
    """An exception from the user's model in one line: TorchScript's ends its serialized traceback
    with the error itself, which is what the line keeps."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def check_embedding_output(out, rows: int, path: str) -> int:
    """The embedding width of a model's output for ``rows`` rows: one tensor, one row out per row
    in, with at least one value each (InputError naming the model otherwise)."""
    if not isinstance(out, _torch().Tensor):
        raise InputError(f"the model's embedding is a {type(out).__name__}, not one tensor", path=path)
    if out.dim() == 0 or out.shape[0] != rows or out.numel() == 0:
        raise InputError(f"the model's embedding has shape {list(out.shape)} for {rows} rows in: it must give one "
                         "row out per row in", path=path)
    return int(out.reshape(rows, -1).shape[1])


class Embedder:
    """Loaded once per worker; turns a batch's feature column into an embedding array (nulls where invalid)."""

    def __init__(self, model_path: str, emb, n_features: int, device: str, n_classes: int | None = None):
        self.model_path, self.emb, self.n_features, self.device_choice = model_path, emb, n_features, device
        self.n_classes = n_classes
        self._fn = None

    def setup(self):
        torch = _torch()
        self.device = device_for(self.device_choice)
        model = load_model(self.model_path, architecture=self.emb.architecture, hidden=self.emb.hidden,
                           in_features=self.n_features, n_classes=self.n_classes).to(self.device)
        self._fn = embedding_fn(model, self.emb.layer)
        self._torch = torch
        self._rows, self._start, self._last = 0, time.monotonic(), time.monotonic()

    def __call__(self, column) -> tuple[pa.Array, np.ndarray]:
        if self._fn is None:
            self.setup()
        torch = self._torch
        x, ok = features_to_numpy(column, self.n_features)
        out = None
        rows = np.flatnonzero(ok)
        shape = tuple(self.emb.features_shape or (self.n_features,))
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(rows), self.emb.inference_batch_size):
                part = torch.from_numpy(x[rows[start:start + self.emb.inference_batch_size]])
                part = part.reshape((-1, *shape)).to(self.device)
                try:
                    out = self._fn(part)
                except Exception as exc:  # noqa: BLE001 - the user's model, not poisonguard, failed
                    raise InputError(f"the model failed on a batch of {len(part)} rows: {model_error(exc)}",
                                     path=self.model_path) from None
                check_embedding_output(out, len(part), self.model_path)
                chunks.append(out.reshape(len(part), -1).float().cpu().numpy())
        dim = chunks[0].shape[1] if chunks else (self.emb.dim or 1)
        out = np.zeros((len(x), dim), dtype=np.float32)
        if chunks:
            out[rows] = np.concatenate(chunks)
        self._progress(len(x))
        flat = pa.array(out.ravel())
        return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~ok)), ~ok

    def _progress(self, rows: int) -> None:
        self._rows += rows
        now = time.monotonic()
        if now - self._last >= 5:
            self._last = now
            rate = self._rows / max(now - self._start, 1e-9)
            log.info("embed: %d rows, %.0f rows/s", self._rows, rate)


def weights_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
