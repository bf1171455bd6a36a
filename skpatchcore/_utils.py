"""Small shared helpers: devices, progress bars, labels from decisions (no torch import)."""

from __future__ import annotations

import tempfile

import numpy as np


def check_writable(folder, who):
    """Create ``folder`` if needed and check a file can be written in it, before any work;
    ValueError naming ``who`` (the option or function) and the folder otherwise."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{who}: cannot write in {str(folder)!r} ({exc.strerror or exc}); "
                         "choose a writable folder.") from None


def as_one_array(maps):
    """A list of maps -> one array when they share a shape, else the list (what
    ``predict_map`` and ``score_and_map`` return for images of one size, or of several)."""
    if len({m.shape for m in maps}) == 1:
        return np.stack(maps)
    return maps


def masks_above(maps, threshold):
    """Boolean masks ``map > threshold`` of maps as :func:`as_one_array` gives them (one
    array, or a list when the sizes differ)."""
    if isinstance(maps, list):
        return [m > threshold for m in maps]
    return maps > threshold


def labels_from_decision(decision):
    """+1 where ``decision >= 0`` (inlier), -1 elsewhere, NaN included: nothing that is not
    a number says "good". The one labelling rule of ``predict``, the CLI and the workers.

    Parameters
    ----------
    decision : array-like of shape (n,)

    Returns
    -------
    labels : ndarray of shape (n,), int

    Examples
    --------
    >>> labels_from_decision([0.5, 0.0, -0.1, float("nan")]).tolist()
    [1, 1, -1, -1]
    """
    decision = np.asarray(decision, dtype=np.float64)
    labels = np.ones(decision.shape, dtype=int)
    labels[~(decision >= 0)] = -1
    return labels


def resolve_device(device):
    """'auto' -> 'cuda' when available else 'cpu'; other strings are checked by torch."""
    import torch  # here, so that progress bars need no torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device={device!r} is not a torch device; use 'auto', 'cpu' or 'cuda'."
        ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use "
                         "device='auto' or 'cpu'.")
    return resolved


def progress(total, desc, unit="it", disable=True):
    """A tqdm progress bar (on stderr), or a silent stand-in when disabled."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=disable, leave=False)
