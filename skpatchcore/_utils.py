"""Small shared helpers: devices and progress bars."""

from __future__ import annotations

import torch


def resolve_device(device):
    """'auto' -> 'cuda' when available else 'cpu'; other strings are checked by torch."""
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
