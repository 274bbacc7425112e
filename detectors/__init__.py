"""Poisoning detectors: pure numpy / scikit-learn estimators, usable without Beam."""

from detectors.activation_clustering import ActivationClustering
from detectors.base import PoisonDetector
from detectors.calibration import ClassDecision, separated_minority
from detectors.knn_label import KnnLabel
from detectors.spectral import SpectralSignatures
from detectors.spectre import Spectre
from detectors.stats import ClassState, merge_states, states_by_class

DETECTORS: dict[str, type[PoisonDetector]] = {
    cls.name: cls for cls in (SpectralSignatures, ActivationClustering, Spectre, KnnLabel)
}


def make_detector(name: str, **params) -> PoisonDetector:
    try:
        return DETECTORS[name](**params)
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}") from None


__all__ = [
    "DETECTORS", "ActivationClustering", "ClassDecision", "ClassState", "KnnLabel",
    "PoisonDetector", "SpectralSignatures", "Spectre", "make_detector", "merge_states",
    "separated_minority", "states_by_class",
]
