"""PatchCore industrial image anomaly detection as scikit-learn estimators."""

__version__ = "0.1.0"

from .coreset import CoresetSampler, MemoryBank  # noqa: E402
from .detector import PatchCoreDetector  # noqa: E402
from .features import FeatureExtractor  # noqa: E402
from .padim import PaDiMDetector  # noqa: E402
from .persistence import load_model, save_model  # noqa: E402
from .pipeline import PatchCorePipeline, make_anomaly_pipeline, make_patchcore  # noqa: E402
from .spade import SPADEDetector  # noqa: E402

__all__ = [
    "CoresetSampler",
    "FeatureExtractor",
    "MemoryBank",
    "PaDiMDetector",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "SPADEDetector",
    "load_model",
    "make_anomaly_pipeline",
    "make_patchcore",
    "save_model",
]
