"""poisonguard: screen a training dataset for poisoning before every training cycle.

    import poisonguard
    result = poisonguard.scan("data/train.parquet", out="runs/today", config="configs/digits.yaml")
    findings = poisonguard.screen(embeddings, labels)      # in a notebook: per-row findings
"""

import logging as _logging
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("poisonguard")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_logging.getLogger("poisonguard").addHandler(_logging.NullHandler())


def __getattr__(name):
    """The API and detectors load on first use, so ``import poisonguard`` stays cheap."""
    if name in ("scan", "screen", "ScanResult", "Findings"):
        from poisonguard import api

        return getattr(api, name)
    if name in ("Config", "load_config"):
        from poisonguard import config

        return getattr(config, name)
    if name in ("SpectralSignatures", "ActivationClustering", "Spectre", "KnnLabel", "DETECTORS"):
        from poisonguard import detectors

        return getattr(detectors, name)
    raise AttributeError(f"module 'poisonguard' has no attribute {name!r}")


__all__ = ["scan", "screen", "ScanResult", "Findings", "Config", "load_config", "SpectralSignatures",
           "ActivationClustering", "Spectre", "KnnLabel", "DETECTORS", "__version__"]
