"""Poisoning detectors: pure numpy / scikit-learn estimators, usable without Beam."""

from poisonguard.detectors.activation_clustering import ActivationClustering
from poisonguard.detectors.base import PoisonDetector
from poisonguard.detectors.calibration import ClassDecision, separated_minority
from poisonguard.detectors.confident_label import ConfidentLabel
from poisonguard.detectors.knn_distance import KnnDistance
from poisonguard.detectors.knn_label import KnnLabel
from poisonguard.detectors.spectral import SpectralSignatures
from poisonguard.detectors.spectre import Spectre
from poisonguard.detectors.stats import ClassState, merge_states, states_by_class

DETECTORS: dict[str, type[PoisonDetector]] = {
    cls.name: cls for cls in (SpectralSignatures, ActivationClustering, Spectre, KnnLabel, ConfidentLabel, KnnDistance)
}
# the detectors a config without a detectors list runs (chosen on the quality benchmark); confident_label
# is opt-in until the held-out benchmark families decide
# chosen on the development benchmark families (benchmarks/choose_defaults.py): every detector,
# the cluster ones at min_separation 5 and cross-class z >= 6, k-NN at 0.9, confident learning
DEFAULT_DETECTORS = ("spectral", "activation_clustering", "spectre", "knn_distance", "knn_label", "confident_label")


def make_detector(name: str, **params) -> PoisonDetector:
    try:
        return DETECTORS[name](**params)
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; known: {', '.join(DETECTORS)}") from None


__all__ = [
    "DEFAULT_DETECTORS", "DETECTORS", "ActivationClustering", "ClassDecision", "ClassState", "ConfidentLabel", "KnnDistance", "KnnLabel",
    "PoisonDetector", "SpectralSignatures", "Spectre", "make_detector", "merge_states",
    "separated_minority", "states_by_class",
]
