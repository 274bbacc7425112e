"""Where a block's embeddings come from: a column, the user's model, or a proxy trained here.

``resolve_embedding`` runs once on the driver (trains the proxy, checks the model, fixes the
dimension); ``make_embedder`` builds the per-worker callable (its model loads lazily, once).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace


from poisonguard.config import Config
from poisonguard.errors import InputError
from poisonguard.io import InputPlan, sha256_file
from poisonguard.names import PROXY_MODEL

log = logging.getLogger("poisonguard")


def resolve_embedding(plan: InputPlan, config: Config, work_dir: str) -> tuple[InputPlan, dict]:
    """Train the proxy or check the user's model; fix the embedding dimension from a dry run."""
    emb = config.embedding
    if emb.source == "column":
        return plan, {"source": "column", "column": config.columns.embedding, "dim": plan.dim, "label_view": "embedding"}
    info: dict = {"source": emb.source, "features": emb.features, "features_shape": emb.features_shape}
    confirmed: tuple = ()
    if emb.source == "proxy":
        from poisonguard.proxy import train_proxy

        os.makedirs(work_dir, exist_ok=True)
        path = os.path.join(work_dir, PROXY_MODEL)
        log.info("proxy: training on up to %d rows for %d epochs", emb.proxy_max_rows, emb.proxy_epochs)
        record, sample = train_proxy(plan, config, path)
        info.update(record)
        log.info("proxy: training accuracy %.4f", info["train_accuracy"])
        if emb.proxy_exclusion:
            from poisonguard.core.exclusion import exclusion_check

            info["exclusion"], confirmed = exclusion_check(sample, plan, config)
    else:
        path = os.path.abspath(emb.model)
        if not os.path.isfile(path):
            raise InputError("model file not found", path=emb.model)
    info["model_file_sha256"] = sha256_file(path)
    dim = _probe_dim(path, plan, config)
    if emb.dim is not None and dim != emb.dim:
        raise InputError(f"model output dimension {dim} disagrees with embedding.dim={emb.dim}",
                         path=emb.model or path)
    info["dim"] = dim
    info["label_view"] = label_view(emb.label_view, emb.source, (info.get("layout") or {}).get("kind"))
    return replace(plan, dim=dim, model_path=path, label_view=info["label_view"], confirmed_groups=confirmed), info


def label_view(choice: str, source: str, layout: str | None) -> str:
    """auto: a proxy on a table gives confident learning the features themselves.  The proxy is trained
    to near-zero loss on the labels as given, so it memorises flipped ones (a 20% targeted flip of a
    178-row table: training accuracy 1.00, held-out 0.72) and flipped rows land inside the class they
    were given; the features never saw a label.  On the development table source (breast cancer,
    ``benchmarks/families.py proxy``) this took label flips from F1 0.13-0.15 to 0.83-0.88; the
    backdoor detectors keep the proxy, where triggers separate (the k-NN check too: on raw features
    alone it flagged 1.6% of clean rows, boundary rows; it takes their vote, ``detectors.feature_votes``,
    and the sub-mode rule asks them too, ``detectors.lookalike``)."""
    if choice != "auto":
        return choice
    return "features" if source == "proxy" and layout == "table" else "embedding"


def _probe_dim(path: str, plan: InputPlan, config: Config) -> int:
    import torch

    from poisonguard.embed import check_embedding_output, embedding_fn, load_model, model_error
    from poisonguard.layout import check_declared_shape

    emb = config.embedding
    model = load_model(path, architecture=emb.architecture, hidden=emb.hidden, in_features=plan.n_features,
                       n_classes=None)
    check_declared_shape(emb.features_shape, plan.n_features, emb.features)
    shape = tuple(emb.features_shape or (plan.n_features,))
    try:
        with torch.inference_mode():
            out = embedding_fn(model, emb.layer)(torch.zeros((3, *shape)))
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model can fail in many ways on the wrong input
        raise InputError(f"model cannot embed features of shape {list(shape)}: {model_error(exc)}",
                         path=emb.model or path) from None
    return check_embedding_output(out, 3, emb.model or path)


def make_embedder(plan: InputPlan, config: Config):
    """None for an embedding column; else an Embedder (its model loads lazily, once per worker)."""
    if config.embedding.source == "column":
        return None
    from poisonguard.embed import Embedder

    return Embedder(plan.model_path, config.embedding, plan.n_features, config.embedding.device)
