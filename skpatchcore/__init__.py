"""PatchCore industrial image anomaly detection as scikit-learn estimators."""

from ._containers import MemoryBank, PatchFeatures
from ._images import set_max_image_pixels
from ._version import __version__
from .coreset import CoresetSampler
from .detector import PatchCoreDetector
from .features import FeatureExtractor
from .padim import PaDiMDetector
from .persistence import load_model, save_model
from .pipeline import PatchCorePipeline, make_anomaly_pipeline, make_patchcore
from .spade import SPADEDetector

__all__ = [
    "CoresetSampler",
    "FeatureExtractor",
    "MemoryBank",
    "PaDiMDetector",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "PatchFeatures",
    "SPADEDetector",
    "__version__",
    "load_model",
    "make_anomaly_pipeline",
    "make_patchcore",
    "save_model",
    "set_max_image_pixels",
]
