"""PatchCore industrial image anomaly detection as scikit-learn estimators.

The public names are imported on first use (PEP 562), so that ``import skpatchcore`` does
not import torch: ``skpatchcore predict MODEL.onnx`` scores with onnxruntime alone.
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

from ._version import __version__

# public name -> the module that defines it
_PUBLIC = {
    "AnomalyEnsemble": "ensemble",
    "CoresetSampler": "coreset",
    "DistillationDetector": "mkd",
    "FeatureExtractor": "features",
    "FocusDistributionDetector": "fyd",
    "MemoryBank": "_containers",
    "PaDiMDetector": "padim",
    "PatchCoreDetector": "detector",
    "PatchCorePipeline": "pipeline",
    "PatchFeatures": "_containers",
    "SPADEDetector": "spade",
    "StudentTeacherDetector": "students",
    "export_onnx": "export",
    "load_model": "persistence",
    "make_anomaly_pipeline": "pipeline",
    "make_ensemble": "ensemble",
    "make_model": "methods",
    "make_patchcore": "pipeline",
    "save_model": "persistence",
    "set_max_image_pixels": "_images",
}

__all__ = [
    "AnomalyEnsemble",
    "CoresetSampler",
    "DistillationDetector",
    "FeatureExtractor",
    "FocusDistributionDetector",
    "MemoryBank",
    "PaDiMDetector",
    "PatchCoreDetector",
    "PatchCorePipeline",
    "PatchFeatures",
    "SPADEDetector",
    "StudentTeacherDetector",
    "__version__",
    "export_onnx",
    "load_model",
    "make_anomaly_pipeline",
    "make_ensemble",
    "make_model",
    "make_patchcore",
    "save_model",
    "set_max_image_pixels",
]

if TYPE_CHECKING:
    from ._containers import MemoryBank, PatchFeatures
    from ._images import set_max_image_pixels
    from .coreset import CoresetSampler
    from .detector import PatchCoreDetector
    from .ensemble import AnomalyEnsemble, make_ensemble
    from .export import export_onnx
    from .features import FeatureExtractor
    from .fyd import FocusDistributionDetector
    from .methods import make_model
    from .mkd import DistillationDetector
    from .padim import PaDiMDetector
    from .persistence import load_model, save_model
    from .pipeline import PatchCorePipeline, make_anomaly_pipeline, make_patchcore
    from .spade import SPADEDetector
    from .students import StudentTeacherDetector


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f".{name}", __name__):
        return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. datasets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
