"""Where compression runs: the service's `compress.device` setting ("auto", "cpu" or "cuda")
resolved against what torch sees on this machine, once, when the worker starts."""

from __future__ import annotations

import torch

from tokenmill.common.errors import FailedPrecondition, InvalidArgument

DEVICE_SETTINGS = ("auto", "cpu", "cuda")


def resolve_device(setting: str) -> torch.device:
    """The "auto" setting picks the first GPU when torch sees one, else the CPU; "cuda" without a GPU is refused
    (a deployment that asked for one should not silently run many times slower)."""
    if setting not in DEVICE_SETTINGS:
        raise InvalidArgument(f"compress device {setting!r} is not one of {list(DEVICE_SETTINGS)}")
    has_gpu = torch.cuda.is_available()
    if setting == "cuda" and not has_gpu:
        raise FailedPrecondition(
            "compress.device is 'cuda' but torch sees no GPU on this machine (torch.cuda.is_available() "
            "is False); set compress.device to 'auto' or 'cpu', or run on a GPU node"
        )
    if setting == "cpu" or not has_gpu:
        return torch.device("cpu")
    return torch.device("cuda", 0)
