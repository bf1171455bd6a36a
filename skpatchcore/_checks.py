"""The quick check of a model's parameters before any image is read, by duck typing (this
module imports nothing, so that the method registry and the ensemble can both use it)."""

from __future__ import annotations

__all__ = ["check_model"]


def check_model(model):
    """Check a model's parameters quickly, before any image is read: a pipeline's feature
    options load the network (which finds a missing weights file) and its other steps
    validate their parameters; an ensemble checks its own parameters and every member's."""
    if hasattr(model, "_check_members"):  # an AnomalyEnsemble
        model._validate_params()
        for _, member in model._check_members():
            check_model(member)
    elif hasattr(model, "steps"):
        model[0].fit()
        for _, step in model.steps[1:]:
            step._validate_params()
    else:
        model._validate_params()
