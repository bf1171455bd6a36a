"""PatchCore industrial image anomaly detection as scikit-learn estimators."""

from .coreset import CoresetSampler, MemoryBank
from .detector import PatchCoreDetector
from .features import FeatureExtractor
from .pipeline import PatchCorePipeline, make_patchcore

__version__ = "0.1.0"

__all__ = [
    "CoresetSampler",
    "FeatureExtractor",
    "MemoryBank",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "make_patchcore",
]
